#!/usr/bin/env bash
# Installs the system packages, fetches the default model, builds, and runs
# every test with ctest (which prints its summary). The exit status is ctest's.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh
bash scripts/fetch-corpus.sh
bash scripts/build.sh

ctest --test-dir "${INFERLAB_BUILD_DIR:-build}" --output-on-failure -j"${INFERLAB_TEST_JOBS:-2}"
