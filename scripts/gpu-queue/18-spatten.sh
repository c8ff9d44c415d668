# cap: 60
# Issue 18 (SpAtten): decode steps of the cascade on the GPU against dense, on
# the Llama-2-7B shape (32 layers, 32 heads, random weights made on the GPU)
# at 32K tokens of context: whole-step and attention time per step, keys read
# per step and kv head, resident KV. Every setting decodes from a device copy
# of one dense prefill, so its first steps prune the 32K cache down to the
# schedule (keep 1.0 in layers 0-9, 0.3 from layer 21 on); the timed steps
# come after them. Its engine tests run in the test steps
# (CudaSchedule.SequenceRetentionReadsWhatTheCascadeLeft, HeadOutputNorms), as
# do those of progressive quantization (bit-plane pages: CudaOps/KvCacheBitPlanes,
# *CudaAttentionBitPlanes*, *CudaEngineBitPlanes*); this bench has no
# quantization row: its settings start from a clone of the dense device
# prefill, and KvSequence::clone converts formats between host pools only.
# What to look for: attention time and keys read falling well below dense
# (about 0.5x the keys averaged over layers), the step time following as far
# as the host work of the cascade (statistics and masks per layer) allows.
set -u
bin=$1
timeout 55 "$bin/bench_cuda_kv_methods" --preset llama2-7b-128k --context 32768 --steps 16 --only spatten
