# cap: 40
# Issue 22 (early exit): SkipDecode on the CUDA backend at the Llama-2-7B shape (llama2-7b-128k)
# (random weights, 32 layers), 4096 cached tokens, 16 decode steps per row:
# dense against a fixed budget of 16 and of 8 layers (warm-up 1 + top layers,
# skipped layers store no KV). What to look for: ms/step against dense near the
# weights-read ratio (at 7B the LM head is ~3% of a step's bytes, so 16 layers
# should come close to 2x and 8 layers to ~3.6x: (32 + 1) / (layers + 1)); a
# plan-only method keeps CUDA graph replays (SDK ABI 13: no hidden state comes
# back per layer). Correctness: tests CudaHfCheckpoint.* and the engine step.
set -u
bin=$1
timeout 37 "$bin/bench_cuda_kv_methods" --preset llama2-7b-128k --context 4096 --steps 16 --only skipdecode
