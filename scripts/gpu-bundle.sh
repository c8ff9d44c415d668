#!/usr/bin/env bash
# Builds the CUDA backend here (sm_90) and packs what the GPU validation needs
# into .device/bundle.tar.xz (git-ignored; a device call carries at most 64 MiB):
# the test and benchmark binaries, the plugins, and the shared libraries the GPU
# machine lacks. Then, on the GPU machine (device tool), carrying .device:
#   bash scripts/gpu-validate.sh tests   (then  ... bench  and  ... kv)
# usage: scripts/gpu-bundle.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
cmake -S "$root" -B "$build" -DINFERLAB_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target inferlab inferlab_gpu_tests bench_cuda_attention bench_cuda_decode bench_cuda_kv_methods \
  probe dense quest h2o streamingllm
dev=$root/.device
rm -rf "$dev/bin" "$dev/lib" "$dev/bundle.tar.xz"
mkdir -p "$dev/bin/plugins" "$dev/bin/test-plugins"
cp "$build"/bin/inferlab "$build"/bin/inferlab_gpu_tests "$build"/bin/bench_cuda_attention \
  "$build"/bin/bench_cuda_decode "$build"/bin/bench_cuda_kv_methods "$dev/bin/"
cp "$build"/bin/plugins/*.so "$dev/bin/plugins/"
cp "$build"/tests/plugins/inferlab-plugin-probe.so "$dev/bin/test-plugins/"
bundle=$root/../shared/device/bundle-libs.sh
if [[ -x $bundle ]]; then
  "$bundle" "$dev/lib" "$dev/bin" >/dev/null
else
  echo "gpu-bundle: $bundle not found; copy the non-CUDA shared libraries into $dev/lib yourself" >&2
fi
strip --strip-unneeded "$dev"/bin/* "$dev"/bin/plugins/*.so "$dev"/bin/test-plugins/*.so "$dev"/lib/* 2>/dev/null || true
tar -C "$dev" -cJf "$dev/bundle.tar.xz" bin lib
rm -rf "$dev/bin" "$dev/lib"
du -sh "$dev/bundle.tar.xz"
