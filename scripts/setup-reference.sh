#!/usr/bin/env bash
# Creates the Python virtual environment used by the independent-reference
# tooling (tests/reference/, benchmarks/llamacpp_reference.py): numpy, gguf and
# llama-cpp-python. llama-cpp-python compiles llama.cpp from source with CMake,
# which takes several minutes on a small machine; reruns are fast because an
# existing, working venv is kept.
#
# Usage: bash scripts/setup-reference.sh        (venv at $INFERLAB_REF_VENV, default .venv-ref)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFERLAB_REF_VENV:-$repo_root/.venv-ref}"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-reference: '$python' not found; run scripts/install-deps.sh first" >&2
    exit 1
fi

if [[ -x "$venv/bin/python" ]] &&
   "$venv/bin/python" -c 'import numpy, gguf, llama_cpp' >/dev/null 2>&1; then
    echo "setup-reference: $venv already has numpy, gguf and llama-cpp-python"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-reference: creating virtual environment $venv"
    if ! "$python" -m venv "$venv"; then
        echo "setup-reference: 'python3 -m venv' failed; on Debian install python3-venv" \
             "(scripts/install-deps.sh does)" >&2
        exit 1
    fi
fi

# A CPU-only build of llama.cpp tuned for this machine. Callers may override.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

echo "setup-reference: installing numpy, gguf, llama-cpp-python (builds llama.cpp; several minutes)"
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
"$venv/bin/python" -m pip install numpy gguf llama-cpp-python
"$venv/bin/python" -c 'import numpy, gguf, llama_cpp; print("setup-reference: llama_cpp", llama_cpp.__version__)'
