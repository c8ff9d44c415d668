#!/usr/bin/env bash
# CPU rehearsal of scripts/gpu-validate.sh, so the GPU window's script cannot
# rot between windows: with the GPU hidden it runs every step against a build
# tree (tests skip; benchmarks must stop at "no GPU", not at their arguments),
# writes at most 8 files, records every step, and `failed` reruns only what a
# previous run's steps.tsv lists.
# usage: gpu_validate_rehearsal.sh REPO BUILD_DIR
set -euo pipefail
repo=$1 build=$2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export CUDA_VISIBLE_DEVICES= INFERLAB_GPU_BIN=$build/bin INFERLAB_TEST_PLUGIN_DIR=$build/tests/plugins
OUT=$out/all bash "$repo/scripts/gpu-validate.sh" all >/dev/null
fail() { echo "rehearsal: $*"; cat "$out"/all/summary.md; exit 1; }
files=$(find "$out/all" -type f | wc -l)
((files <= 8)) || fail "$files result files (at most 8)"
for step in ldd tests-ops tests-attention tests-engine bench-attention bench-sdpa bench-decode bench-kv; do
  grep -q "^$step"$'\t' "$out/all/steps.tsv" || fail "step $step missing"
done
while IFS=$'\t' read -r step status _; do  # queued steps of later issues included
  [[ $status == passed || $status == rehearsed ]] || fail "step $step: $status"
done <"$out/all/steps.tsv"
# Every GPU test was reached (all skip here): the groups' filters cover the binary.
listed=$("$build/bin/inferlab_gpu_tests" --gtest_list_tests | grep -c '^  ')
skipped=$(grep -c '^\[  SKIPPED \] .* ([0-9]* ms)$' "$out/all/tests.log")
((listed == skipped)) || fail "the test groups reached $skipped of $listed GPU tests"
printf 'ldd\tpassed\t0\t\ntests-ops\tfailed\t3\tCudaSlotPlanes.FillMoveAndCopyMatchTheTwins\nbench-kv\ttimeout\t40\t\n' >"$out/last.tsv"
OUT=$out/failed INFERLAB_GPU_LAST=$out/last.tsv bash "$repo/scripts/gpu-validate.sh" failed >/dev/null
[[ $(cut -f1 "$out/failed/steps.tsv" | tr '\n' ' ') == "ldd tests-ops bench-kv " ]] || fail "failed mode reran $(cut -f1 "$out/failed/steps.tsv" | tr '\n' ' ')"
grep -q '^\[  SKIPPED \] CudaSlotPlanes.FillMoveAndCopyMatchTheTwins' "$out/failed/tests.log" || fail "failed mode did not rerun the failed test"
[[ $(grep -c '^\[  SKIPPED \] .* ([0-9]* ms)$' "$out/failed/tests.log") == 1 ]] || fail "failed mode ran more than the failed test"
echo "rehearsal: $listed GPU tests reached, $files result files, failed mode reran 3 steps"
