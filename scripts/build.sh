#!/usr/bin/env bash
# Configures and builds inferlab (Release) into build/.
#   INFERLAB_CUDA=AUTO|ON|OFF   CUDA backend (default AUTO: built when nvcc is found)
#   INFERLAB_BUILD_DIR=DIR      build directory (default build)
#   INFERLAB_JOBS=N             parallel jobs (default: number of cores)
#   INFERLAB_TARGETS="T ..."    build only these targets (default: everything, tests included)
#   INFERLAB_WERROR=ON|OFF      warnings are errors (default OFF; scripts/test.sh sets ON under CI=true)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

build_dir="${INFERLAB_BUILD_DIR:-build}"
jobs="${INFERLAB_JOBS:-$(nproc 2>/dev/null || echo 2)}"

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DINFERLAB_CUDA="${INFERLAB_CUDA:-AUTO}" \
  -DINFERLAB_WERROR="${INFERLAB_WERROR:-OFF}"
targets=()
for t in ${INFERLAB_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build_dir" -j"$jobs" "${targets[@]}"
