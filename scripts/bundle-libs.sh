#!/usr/bin/env bash
# Copies into DEST every shared library the ELF files under PATH... load that a
# GPU machine cannot be assumed to have: everything but the C and C++ runtimes
# (glibc, libstdc++, libgcc) and NVIDIA's own (the driver, the CUDA runtime,
# cuBLAS), which come with the GPU machine's driver and CUDA toolkit. Lists
# what it copied.
# usage: scripts/bundle-libs.sh DEST PATH...
set -euo pipefail
dest=${1:?usage: bundle-libs.sh DEST PATH...}
shift
mkdir -p "$dest"
system='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnvidia|libnvrtc)[.-]'
find "$@" -type f -print0 | while IFS= read -r -d '' f; do
  [[ $(head -c 4 "$f" | tail -c 3) == ELF ]] || continue
  ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  [[ $(basename "$lib") =~ $system ]] && continue
  cp -L "$lib" "$dest/"
  basename "$lib"
done
