# cap: 40
# Issue 22 (early exit): CALM on the CUDA backend (ExitPolicy: the confidence
# computed on the GPU, one float back per check) at the Llama-2-7B shape
# (llama2-7b-128k: random f16 weights, 32 layers, d 4096, vocab 32000), 4096
# cached tokens, 16 decode steps per row. Random weights make no confidence
# meaningful, so the thresholds force a known behaviour (tau 0: threshold = lambda):
#   calm softmax every k layers, no exit   lambda 1, checks after layers k, 2k, ...
#                                          below 32: 7, 3, 1 checks for k = 4, 8, 16
#   calm state every 4 layers, no exit     lambda 1, the same 7 checks, a cosine each
#   calm softmax exit after layer 16       lambda 1e-30 (under every margin): one check
#                                          after layer 16, where every token exits
# What to look for, by bytes per step (f16): a layer reads 202.4M weights
# (4 d^2 + 3 d 11008) and 33.6M KV values at 4096 tokens; the LM head is 131.1M
# (0.65 layer; 2.0% of the weights, 1.7% of a dense step's 7681M values =
# 15.4 GB, ~3.2-3.8 ms at 4.8-4 TB/s). A softmax check is one LM head GEMV
# (~55-65 us) + top-2, so ms/step vs dense: every 4 -> 0.89x (7 checks = 4.5
# layers of weights), every 8 -> 0.95x, every 16 -> 0.98x. A state check reads
# ~nothing: its row is what every checking row pays beyond bytes (7 host round
# trips, the GPU idle during each, and eager launches where dense replays its
# graph); expect it near 1x, and the softmax rows short of the byte ratios by
# about as much. The exit row runs 16 layers, two LM heads (the check's and the
# logits') and the K/V projections of the 16 skipped layers (2 d^2 each, 0.17
# layer; state propagation): 4574M values -> ~1.68x dense (1.64x by weights
# alone), attention ~2x faster and half of dense's keys read/step/head.
# Lines under the table: exit checks/step 7, 3, 1, 7, 1; layers run/step 32,
# and 16 in the exit row with 16 of 16 steps exited (0 elsewhere: a top-2 tie
# would not exit); 0 graph replays in every calm row.
# Correctness: tests CudaExitPolicy.* (kernel twins) and CudaExitEngine.* (per measure).
set -u
bin=$1
timeout 37 "$bin/bench_cuda_kv_methods" --preset llama2-7b-128k --context 4096 --steps 16 --only calm
