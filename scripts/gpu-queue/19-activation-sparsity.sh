# cap: 60
# Issue 19 (TEAL, CATS, Deja Vu): activation sparsity on the Llama-2-7B shape (32
# layers, 4096 wide, FFN 11008; random bf16/f16 weights made on the GPU).
# First the kernels, one row against one projection: cuBLAS's dense GEMV
# against the input-sparse GEMV on the transposed weight at input sparsity
# 0-0.9 (µs, GB/s of the rows it must read, % of peak). Then whole decode
# steps at 1024 tokens of context with graphs: dense, TEAL (all seven
# projections) and CATS (gate threshold) at 0.25/0.5/0.75, thresholds from the
# model's own activations, the sparsity the counters measured per row, and the
# weights plus their transposed copies resident; then Deja Vu's predicted
# components (random rank-128 predictors run by the engine on the device, on a
# side stream, in graphs) keeping 50%/25% of the neurons and 25% with 50% of
# the heads. Its engine tests run in the test steps (CudaActivationSparsity.*,
# CudaComponentSelection.*, CudaPredictors.*).
# What to look for: the sparse GEMV's time falling with its kept rows (TEAL's
# 1.5-1.8x at 40-50% needs it near the dense GEMV's bandwidth), and whether a
# whole step beats dense from some sparsity on, or why not (the gate stays dense under CATS);
# for Deja Vu, the step against dense at 25% neurons (the FFN's bytes fall 4x; the
# predictors add about 3% of the FFN's bytes) and graphs > 0 (decisions on the device).
set -u
bin=$1
timeout 55 "$bin/bench_cuda_activation_sparsity" --preset llama2-7b --context 1024 --steps 32
