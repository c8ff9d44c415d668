# cap: 25
# Issue 20 (LoRA, QLoRA): 4-bit weights on the GPU at the Llama-2-7B shapes
# (q/o 4096x4096, gate/up 11008x4096, down 4096x11008; random normal weights
# quantized on the host). Decode: cuBLAS's fp16 GEMV against the fused
# dequantizing GEMV through NF4 and NF4 with double quantization (µs, bytes
# read, GB/s, % of the H200's 4.8 TB/s). Prefill (512 rows): fp16 GEMM against
# dequantize-into-fp16 then GEMM (TFLOP/s).
# What to look for: the NF4 GEMV near 3.5x faster than fp16 where both are
# bandwidth-bound (it reads 0.28x the bytes); its GB/s against peak (decoding
# the codes must not make it compute-bound); the prefill's dequantization
# overhead against the GEMM. Correctness runs in the test steps
# (CudaQuant4.KernelsMatchTheirCpuTwins, CudaWeightStorage.*, CudaAdapters.*);
# whole decode steps with adapters and 4-bit weights: bench_lora --backend
# cuda (not queued: a 7B-shape model takes longer to write than this cap).
set -u
bin=$1
timeout 22 "$bin/bench_cuda_quant4" --repeats 100 --rows 512
