# cap: 45
# Issue 20 (LoRA, QLoRA): 4-bit weights on the GPU at the Llama-2-7B shapes
# (q/o 4096x4096, gate/up 11008x4096, down 4096x11008; random normal weights
# quantized on the host). Decode: cuBLAS's fp16 GEMV against the fused
# dequantizing GEMV through NF4 and NF4 with double quantization (µs, bytes
# read, GB/s, % of the H200's 4.8 TB/s). Prefill (512 rows): fp16 GEMM against
# dequantize-into-fp16 then GEMM (TFLOP/s). Then whole decode steps on the
# CUDA backend (graphs) of one layer of the Llama-2-7B shape (synthetic f16
# weights; the embedding and output layer stay fp16): dense, LoRA r=16/64
# merged and unmerged, NF4+DQ layer weights alone and with r=64 unmerged.
# What to look for: the NF4 GEMV near 3.5x faster than fp16 where both are
# bandwidth-bound (it reads 0.28x the bytes); its GB/s against peak (the
# decode of the codes must not make it compute-bound); the prefill's
# dequantization overhead falling with the row count; unmerged adapters'
# per-step cost growing with the rank, merged equal to dense. The kernels'
# and the engine's correctness run in the test steps (CudaQuant4.*,
# CudaWeightStorage.*, CudaAdapters.*).
set -u
bin=$1
timeout 20 "$bin/bench_cuda_quant4" --repeats 100 --rows 512
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin/inferlab" model synth --preset llama2-7b --layers 1 -o "$work/7b-1layer.gguf" || exit 1
timeout 18 "$bin/bench_lora" --model "$work/7b-1layer.gguf" --backend cuda --context 256 --steps 16 --rounds 3 \
  --ranks 16,64 --gemv-reps 0
