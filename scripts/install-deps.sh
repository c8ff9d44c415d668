#!/usr/bin/env bash
# Installs the Debian packages inferlab needs to build, test and fetch its
# model. Idempotent and non-interactive: when every package is already
# installed it does nothing (no apt-get update), so reruns are fast.
set -euo pipefail

packages=(
    build-essential cmake pkg-config git
    python3 python3-pip python3-venv
    libtomlplusplus-dev libboost-dev libboost-filesystem-dev libfmt-dev
    libsqlite3-dev libgtest-dev libgmock-dev libopenblas-dev libcli11-dev
    libopenblas-openmp-dev  # CMakeLists.txt links the OpenMP build of OpenBLAS
    nlohmann-json3-dev libpcre2-dev libssl-dev
    unzip ca-certificates
    clang libclang-rt-14-dev  # scripts/sanitize.sh: ASan/UBSan tests and libFuzzer targets
    python3-matplotlib chromium  # `inferlab plot`, `report --html`, and the ctest label "report" (headless Chromium)
    slurm-wlm munge  # the ctest label "slurm": `inferlab slurm --submit` on a one-node cluster the test starts
)

is_installed() {
    local status
    status="$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" || return 1
    [[ "$status" == "installed" ]]
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: this script needs a Debian/Ubuntu system (dpkg-query and apt-get)." >&2
    echo "install-deps: install these packages (or your system's equivalents) by hand:" >&2
    echo "  ${packages[*]}" >&2
    exit 1
fi

missing=()
for package in "${packages[@]}"; do
    is_installed "$package" || missing+=("$package")
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all ${#packages[@]} packages already installed"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: installing them needs root, and sudo is not available." >&2
    echo "install-deps: run this script as root, or ask an administrator to run:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"

still_missing=()
for package in "${missing[@]}"; do
    is_installed "$package" || still_missing+=("$package")
done
if ((${#still_missing[@]} > 0)); then
    echo "install-deps: apt-get finished but these are still not installed: ${still_missing[*]}" >&2
    exit 1
fi
echo "install-deps: done"
