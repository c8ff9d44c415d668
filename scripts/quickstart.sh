#!/usr/bin/env bash
# From a fresh checkout to a first result: installs the system packages,
# fetches the default model and the perplexity corpus, builds, runs
# experiments/quickstart.toml and prints its report.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/install-deps.sh
bash scripts/fetch-model.sh
bash scripts/fetch-corpus.sh
# Only the host and its plugins (the plugins are dependencies of the host
# target): the tests are built by scripts/test.sh.
INFERLAB_TARGETS="${INFERLAB_TARGETS:-inferlab}" bash scripts/build.sh

inferlab="${INFERLAB_BUILD_DIR:-build}/bin/inferlab"

db="${INFERLAB_DB:-results/inferlab.db}"
# Runs already in the database are skipped, so a second call only reports.
"$inferlab" run experiments/quickstart.toml --db "$db"
"$inferlab" report quickstart --db "$db"
