#!/usr/bin/env bash
# Creates the Python virtual environment for the LoRA / QLoRA reference tooling
# (tests/reference/make_bnb_4bit_fixture.py, tests/reference/make_peft_fixture.py):
# torch (CPU), transformers, peft, bitsandbytes, safetensors, gguf, numpy,
# sentencepiece/tokenizers and llama-cpp-python.
#
# A developer-time tool, never used by CI or ctest: the fixtures those scripts
# write are committed, and the C++ tests read them without Python. Rerun it only
# to regenerate the fixtures.
#
# The versions are pinned to the ones the committed fixtures were made with.
# torch comes from the PyTorch CPU wheel index when that is reachable, else from
# PyPI (a CUDA build there: a few GB of NVIDIA wheels, used on the CPU all the
# same). llama-cpp-python compiles llama.cpp from source with CMake, about 5
# minutes on 2 cores. An existing, working venv is kept, so reruns are fast.
#
# Usage: bash scripts/setup-reference-lora.sh   (venv at $INFERLAB_LORA_VENV, default .venv-lora)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFERLAB_LORA_VENV:-$repo_root/.venv-lora}"
python="${PYTHON:-python3}"

TORCH_VERSION=2.15.0
PACKAGES=(
    transformers==5.24.0
    peft==0.21.2
    accelerate==1.15.0
    bitsandbytes==0.50.2
    safetensors==0.8.0
    gguf==0.19.0
    numpy==2.4.6
    sentencepiece==0.2.3
    tokenizers==0.23.3
)
LLAMA_CPP_PYTHON_VERSION=0.3.36
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

check_imports='import torch, transformers, peft, bitsandbytes, safetensors, gguf, numpy, tokenizers, llama_cpp'
print_versions='
import importlib.metadata as md
for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "gguf",
          "numpy", "sentencepiece", "tokenizers", "llama_cpp_python"):
    print(f"setup-reference-lora:   {p} {md.version(p)}")
'

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-reference-lora: '$python' not found; run scripts/install-deps.sh first" >&2
    exit 1
fi

if [[ -x "$venv/bin/python" ]] &&
   "$venv/bin/python" -c "$check_imports" >/dev/null 2>&1; then
    echo "setup-reference-lora: $venv already has torch, transformers, peft, bitsandbytes," \
         "gguf and llama-cpp-python:"
    "$venv/bin/python" -c "$print_versions"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-reference-lora: creating virtual environment $venv"
    if ! "$python" -m venv "$venv"; then
        echo "setup-reference-lora: 'python3 -m venv' failed; on Debian install python3-venv" \
             "(scripts/install-deps.sh does)" >&2
        exit 1
    fi
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    echo "setup-reference-lora: torch already installed"
else
    echo "setup-reference-lora: installing torch $TORCH_VERSION (CPU wheel index)"
    if ! "${pip[@]}" install --retries 1 --timeout 30 --index-url "$TORCH_CPU_INDEX" \
            "torch==$TORCH_VERSION"; then
        echo "setup-reference-lora: the PyTorch CPU index is unreachable; installing torch" \
             "$TORCH_VERSION from PyPI (CUDA build, several GB; runs on the CPU)"
        if ! "${pip[@]}" install "torch==$TORCH_VERSION"; then
            echo "setup-reference-lora: could not install torch $TORCH_VERSION from either index" >&2
            exit 1
        fi
    fi
fi

echo "setup-reference-lora: installing ${PACKAGES[*]}"
if ! "${pip[@]}" install "torch==$TORCH_VERSION" "${PACKAGES[@]}"; then
    echo "setup-reference-lora: installing the Python packages failed (see pip's message above)" >&2
    exit 1
fi

# A CPU-only build of llama.cpp tuned for this machine, as scripts/setup-reference.sh
# builds it. Callers may override.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "setup-reference-lora: installing llama-cpp-python $LLAMA_CPP_PYTHON_VERSION" \
     "(compiles llama.cpp; several minutes)"
if ! "${pip[@]}" install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"; then
    echo "setup-reference-lora: building llama-cpp-python failed; it needs a C++ compiler" \
         "(scripts/install-deps.sh installs one)" >&2
    exit 1
fi

if ! "$venv/bin/python" -c "$check_imports"; then
    echo "setup-reference-lora: the venv was installed but an import fails (see above)" >&2
    exit 1
fi
echo "setup-reference-lora: $venv ready:"
"$venv/bin/python" -c "$print_versions"
