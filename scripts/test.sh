#!/usr/bin/env bash
# Installs the system packages, fetches the default model, builds, and runs
# every test with ctest (which prints its summary); then the CPU tests again
# under AddressSanitizer + UndefinedBehaviorSanitizer and each fuzz target for a
# bounded time (scripts/sanitize.sh: 30 s per target, 15 s under CI=true, which
# keeps CI near 25 minutes on 2 cores; INFERLAB_FUZZ_SECONDS overrides;
# INFERLAB_SANITIZE=0 skips that part). Fails when either part fails.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# CI: the project's own sources must build without warnings.
if [[ "${CI:-}" == "true" ]]; then
    export INFERLAB_WERROR="${INFERLAB_WERROR:-ON}"
    export INFERLAB_FUZZ_SECONDS="${INFERLAB_FUZZ_SECONDS:-15}"
fi

bash scripts/install-deps.sh
bash scripts/fetch-model.sh
bash scripts/fetch-corpus.sh
bash scripts/build.sh

status=0
ctest --test-dir "${INFERLAB_BUILD_DIR:-build}" --output-on-failure -j"${INFERLAB_TEST_JOBS:-2}" || status=$?
if [[ "${INFERLAB_SANITIZE:-1}" != "0" ]]; then
    bash scripts/sanitize.sh || status=$?
fi
exit "$status"
