#!/usr/bin/env bash
# The GPU validation of the CUDA backend, run on a machine with a GPU from the
# bundle scripts/gpu-bundle.sh made (.device/). Writes its figures under $OUT
# (the device tool's output folder) or results/gpu/.
#   scripts/gpu-validate.sh tests   # every gpu-labelled test: kernels vs CPU twins, CUDA vs CPU logits
#   scripts/gpu-validate.sh bench   # attention and whole-model benchmarks, torch SDPA beside them
#   scripts/gpu-validate.sh kv      # Quest, StreamingLLM and H2O vs dense at 32K on the 7B shape
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dev=$root/.device
out=${OUT:-$root/results/gpu}
mkdir -p "$out"
if [[ ! -d $dev/bin ]]; then
  tar -C "$dev" -xJf "$dev/bundle.tar.xz"
fi
export LD_LIBRARY_PATH=$dev/lib:${LD_LIBRARY_PATH:-}
export INFERLAB_HOST_PLUGIN_DIR=$dev/bin/plugins INFERLAB_TEST_PLUGIN_DIR=$dev/bin/test-plugins
export INFERLAB_TEST_TMP=${TMPDIR:-/tmp}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/device.txt"
case ${1:-tests} in
  tests)
    "$dev/bin/inferlab_gpu_tests" --gtest_output="xml:$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -40
    ;;
  bench)
    "$dev/bin/bench_cuda_attention" --mode all 2>&1 | tee "$out/bench_cuda_attention.md"
    python3 "$root/scripts/bench_torch_sdpa.py" --mode all 2>&1 | tee "$out/bench_torch_sdpa.md" || true
    "$dev/bin/bench_cuda_decode" --preset llama2-7b-128k --contexts 1024,4096,16384,32768 2>&1 |
      tee "$out/bench_cuda_decode.md"
    ;;
  kv)
    "$dev/bin/bench_cuda_kv_methods" --preset llama2-7b-128k --context 32768 2>&1 | tee "$out/bench_cuda_kv_methods.md"
    ;;
  *)
    echo "usage: $0 tests|bench|kv" >&2
    exit 2
    ;;
esac
