# cap: 60
# Issue 21 (fine-tuning): the CUDA training graph (GraphOptions::cuda) at a
# 7B-wide shape: a synthetic llama2-7b with its first 4 layers (4096 wide,
# 11008 FFN, vocab 32000; written to a temporary file, then loaded as
# float32), batch 4 x 512 tokens, adapters of rank 64 on every projection;
# LoRA on the float32 base and QLoRA on an NF4 base with double quantization,
# each with and without layer checkpointing: median ms per forward + backward,
# training tokens/s, the device memory the activation buffers hold, the base's
# bytes. Correctness runs in the test steps (CudaBackwardKernels.*,
# CudaLoraGraph.*: the graph against the CPU graph).
# What to look for: tokens/s against the SGEMM roofline (6 x params x tokens
# FLOP per step in FP32, about 50 TFLOP/s on an H200 without TF32); how much
# of a step the training attention (one block per query, scores in shared
# memory) takes at 512 tokens; QLoRA's dequantization per projection and call.
set -u
bin=$1
timeout 57 "$bin/bench_finetune" --backend cuda --synthetic llama2-7b --layers 4 --batch 4 --seq-len 512 \
  --ranks 64 --targets all --rounds 3
