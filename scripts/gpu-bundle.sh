#!/usr/bin/env bash
# Builds the CUDA backend here (sm_90) and packs what the GPU validation needs
# into .device/bundle.tar.xz (git-ignored): the test and benchmark binaries, the
# plugins, and the shared libraries a GPU machine lacks (scripts/bundle-libs.sh:
# everything but the C/C++ runtimes and NVIDIA's own). Nothing is built on the
# GPU machine, which needs only a driver, the CUDA toolkit's runtime and cuBLAS
# (13.x, as this build), and python3 with PyTorch for the SDPA comparison.
#
# A remote GPU host, step by step:
#   1. here:  bash scripts/gpu-bundle.sh           (about 10 MB; keep it under 32 MiB)
#   2. copy the repository and .device/bundle.tar.xz to the GPU host
#   3. there: OUT=some/folder bash scripts/gpu-validate.sh all     (at most 6 minutes)
#   4. copy OUT back into results/gpu/<date>-<gpu>/ and commit it; results/gpu/latest/steps.tsv
#      is what `scripts/gpu-validate.sh failed` reruns in the next window
# usage: scripts/gpu-bundle.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
cmake -S "$root" -B "$build" -DINFERLAB_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target inferlab inferlab_gpu_tests bench_cuda_attention bench_cuda_decode bench_cuda_kv_methods \
  bench_cuda_batch bench_cuda_activation_sparsity bench_cuda_quant4 bench_sparse_prefill bench_finetune probe dense quest h2o \
  streamingllm minference spatten teal cats dejavu lora qlora skipdecode calm
dev=$root/.device
rm -rf "$dev/bin" "$dev/lib" "$dev/bundle.tar.xz"
mkdir -p "$dev/bin/plugins" "$dev/bin/test-plugins"
cp "$build"/bin/inferlab "$build"/bin/inferlab_gpu_tests "$build"/bin/bench_cuda_attention \
  "$build"/bin/bench_cuda_decode "$build"/bin/bench_cuda_kv_methods "$build"/bin/bench_cuda_batch \
  "$build"/bin/bench_cuda_activation_sparsity \
  "$build"/bin/bench_cuda_quant4 "$build"/bin/bench_sparse_prefill "$build"/bin/bench_finetune "$dev/bin/"
cp "$build"/bin/plugins/*.so "$dev/bin/plugins/"
cp "$build"/tests/plugins/inferlab-plugin-probe.so "$dev/bin/test-plugins/"
bash "$root/scripts/bundle-libs.sh" "$dev/lib" "$dev/bin" >/dev/null
strip --strip-unneeded "$dev"/bin/* "$dev"/bin/plugins/*.so "$dev"/bin/test-plugins/*.so "$dev"/lib/* 2>/dev/null || true
tar -C "$dev" -cJf "$dev/bundle.tar.xz" bin lib
rm -rf "$dev/bin" "$dev/lib"
size=$(stat -c %s "$dev/bundle.tar.xz")
echo "gpu-bundle: $dev/bundle.tar.xz, $((size / 1024 / 1024)) MiB"
((size <= 32 * 1024 * 1024)) || { echo "gpu-bundle: over 32 MiB" >&2; exit 1; }
