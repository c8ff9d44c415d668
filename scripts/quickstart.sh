#!/usr/bin/env bash
# From a fresh checkout to a first result: installs the system packages,
# fetches the default model, builds, and runs the main job.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh
bash scripts/build.sh

inferlab="${INFERLAB_BUILD_DIR:-build}/bin/inferlab"

# The main job. Swap this function's body when the experiment runner lands.
run_main_job() {
    "$inferlab" model info smollm2-135m
    "$inferlab" generate --model smollm2-135m --prompt "The capital of France is" --max-tokens 32
}

run_main_job
