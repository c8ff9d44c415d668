# cap: 60
# Issue 26 (batching): decode throughput against batch size at a fixed KV memory
# budget (16 GB for the batch), Engine::forward_batch on the CUDA backend, at the
# Llama-2-7B shape (llama2-7b-128k: random f16 weights, 32 layers, 32 kv heads of
# 128, vocab 32000), 4096 prompt tokens per sequence (one dense prefill, every
# sequence a device copy of it), 8 timed decode steps per row after 1 untimed,
# logits for every sequence. Settings: dense; H2O 512+512 (25% of the KV);
# StreamingLLM 4+1024 at cache positions; Quest reading 1024 tokens (keeps all).
# Rows: each setting's largest batch that fits the budget first, then batches
# 1, 4, 16, 64 where they fit; --time-limit 45 starts no row predicted to end
# later (listed under the table as not run).
# What to expect, by bytes (f16): a step reads the weights once whatever the
# batch (13.2 GB of the 13.5 GB resident: all but the embedding table) and each
# sequence's KV once (0.52 MB a token over all layers), so tokens/s grows nearly
# linearly with B while weights dominate and flattens as KV traffic takes over.
# Per sequence at 4106 tokens (the lines above the table): dense 257 pages per
# (layer, kv head) = 2.16 GB -> 7 fit (15.1 GB); H2O 64-65 pages = 0.54 GB -> 29
# fit (~4x); StreamingLLM 65 pages plus the origin pages its re-rotated keys keep
# (cache positions: up to as many again) ~1.1 GB -> ~14 fit (~2x; at original
# positions, --only original, 0.55 GB -> 29); Quest 257 pages + its key bounds
# (1/16) = 2.29 GB -> 6 fit (no saving). At 4-4.8 TB/s: dense batch 1 reads 15.4
# GB (~3.2-3.8 ms, ~260-310 tokens/s); dense batch 7 28.3 GB (~6-7 ms, ~1000-1200
# tokens/s, ~4x batch 1); H2O batch 29 28.8 GB (~6-7 ms, ~4000-4800 tokens/s,
# ~4x dense at its max); StreamingLLM batch 14 20.7 GB (~2.7x); Quest batch 6
# ~1.0-1.1x (0.64 GB read per sequence, but in a batch the engine rebuilds each
# sequence's page bounds from all its keys every step, +1 GB each, not in "KV GB
# read/step": the CUDA bound coverage is per (layer, kv head) for one sequence).
# What may limit instead (the "achieved GB/s" column tells): dense batches up to
# 64 replay one CUDA graph a step (replays = 8 x B); Quest's steps (key
# bounds) and H2O's and StreamingLLM's (eviction per (layer, kv head) with 2-3
# stream waits each, ~2000-3000 per sequence and step) run eagerly, each
# sequence staging its page tables into its own slot (a copy per layer and kv
# head). If ms/step grows by a fixed amount per sequence well above its KV
# bytes (~0.5 ms for a dense sequence, ~0.1 ms for H2O), that host work, not
# bandwidth, is the limit, and the eviction methods' ~4x/~2x of sequences buy
# no tokens/s. "batched calls" should be 8 of 8 for B > 1 (no sequences run
# one by one). `--no-graphs --only dense` (not queued) gives dense eagerly.
# Correctness: tests CudaBatchedCalls.* (batched logits equal to those alone).
set -u
bin=$1
timeout 57 "$bin/bench_cuda_batch" --preset llama2-7b-128k --context 4096 --budget-gb 16 --steps 8 \
  --batches 1,4,16,64 --time-limit 45
