#!/usr/bin/env bash
# The GPU validation of the CUDA backend, run on a machine with a GPU from the
# bundle scripts/gpu-bundle.sh made here (.device/bundle.tar.xz; nothing is
# built there). Every step runs under its own time cap and reports as it ends,
# so a run cut short still leaves its results.
#
#   scripts/gpu-validate.sh all      every step below, in order, in at most $INFERLAB_GPU_BUDGET s (360)
#   scripts/gpu-validate.sh failed   only what failed, timed out or was skipped in the last run
#                                    (its steps.tsv: $INFERLAB_GPU_LAST, default results/gpu/latest/steps.tsv)
#   scripts/gpu-validate.sh STEP...  the named steps (ldd, tests-ops, tests-attention, tests-engine,
#                                    bench-attention, bench-sdpa, bench-decode, bench-kv, queue)
#
# Steps: ldd (every binary finds its libraries; stops the run if not), the GPU
# tests in three groups (bit-exact kernels, attention, engine and plugins), the
# attention benchmark beside torch SDPA, a decode step of the 7B shape against
# the weights + KV roofline, the KV methods at 32K, then the queue: one capped
# step per later issue (scripts/gpu-queue/*.sh, each starting "# cap: SECONDS").
#
# Results, at most 8 files, in $OUT (the device tool's output folder) or
# results/gpu/latest: summary.md (device, each step's status, the failures'
# first lines), steps.tsv (what `failed` reruns), tests.log, bench_attention.md,
# bench_decode.md, bench_kv.md, queue.log.
#
# Without a GPU (or with INFERLAB_GPU_BIN=<a build's bin folder> instead of the
# bundle) the same script rehearses: tests skip, benchmarks must stop at "no
# GPU" rather than at their arguments. ctest runs that rehearsal.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/results/gpu/latest}
budget=${INFERLAB_GPU_BUDGET:-360}
mkdir -p "$out"
start=$SECONDS

# --- where the binaries and libraries are --------------------------------------
if [[ -n ${INFERLAB_GPU_BIN:-} ]]; then
  bin=$INFERLAB_GPU_BIN
  test_plugins=${INFERLAB_TEST_PLUGIN_DIR:-$bin/../tests/plugins}
else
  dev=$root/.device
  if [[ ! -d $dev/bin ]]; then
    [[ -f $dev/bundle.tar.xz ]] || { echo "gpu-validate: no $dev/bundle.tar.xz (run scripts/gpu-bundle.sh here first)" >&2; exit 2; }
    tar -C "$dev" -xJf "$dev/bundle.tar.xz"
  fi
  bin=$dev/bin
  test_plugins=$dev/bin/test-plugins
  export LD_LIBRARY_PATH=$dev/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# The CUDA toolkit's own libraries (cuBLAS, the runtime) first, not whatever the loader's cache holds.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [[ -d $d ]] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export INFERLAB_HOST_PLUGIN_DIR=$bin/plugins INFERLAB_TEST_PLUGIN_DIR=$test_plugins
export INFERLAB_TEST_TMP=${TMPDIR:-/tmp}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then gpu=1; fi
device=$( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true) | head -1)
peak_gbs=${INFERLAB_GPU_PEAK_GBS:-$(case "$device" in *H200*) echo 4800 ;; *H100*) echo 3350 ;; *) echo 0 ;; esac)}

# --- the record: summary.md, steps.tsv ------------------------------------------
summary=$out/summary.md
steps_tsv=$out/steps.tsv
{
  echo "# GPU validation $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- device: ${device:-none visible}"
  echo "- commit: $(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  echo "- command: scripts/gpu-validate.sh $*"
  echo "- budget: ${budget} s"
  echo
  echo "## Steps"
} >"$summary"
: >"$steps_tsv"

# record STEP STATUS SECONDS DETAIL [FIRST LINES]
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$steps_tsv"
  echo "- **$1**: $2 in $3 s${5:+ — $5}" >>"$summary"
}

# The cap a step may use: its own, or what is left of the budget.
cap_for() {
  local left=$((budget - (SECONDS - start)))
  ((left < $1)) && echo "$left" || echo "$1"
}

# run_capped CAP LOG COMMAND...: runs, appends to LOG; returns 124 on timeout.
run_capped() {
  local cap=$1 log=$2
  shift 2
  timeout --signal=TERM --kill-after=5 "$cap" "$@" >>"$log" 2>&1
}

# --- steps -----------------------------------------------------------------------
step_ldd() {
  local missing
  missing=$(for f in "$bin"/* "$bin"/plugins/*.so "$test_plugins"/*.so; do
    [[ -f $f && $(head -c 4 "$f" | tail -c 3) == ELF ]] || continue
    ldd "$f" 2>/dev/null | awk -v f="$(basename "$f")" '/not found/ {print f ": " $1}'
  done)
  if [[ -n $missing ]]; then
    record ldd failed 0 "" "missing libraries: $(echo "$missing" | tr '\n' ';')"
    echo "gpu-validate: binaries lack libraries; nothing else can run:" >&2
    echo "$missing" >&2
    exit 1
  fi
  record ldd passed 0 "" "every binary and plugin finds its libraries"
}

# Test groups (gtest filters over inferlab_gpu_tests).
filter_ops='CudaOps*:CudaOpsArguments*:CudaOpsSampling*:Cuda/PageBounds*:PageBounds*:Cases/CudaRetention*:Cases/CudaSequenceRetention*:CudaSlotPlanes*:Dtypes/CudaRerotationKernel*:Cuda/VerticalSlashScores*:CudaTopKSegments*:CudaBlockScores*:CudaSparsePlanBuild*'
filter_attention='*CudaAttention*'
# Everything else, the 4096-token StreamingLLM streams (Dtypes/CudaRerotationStream*) included.
filter_engine="-${filter_ops}:${filter_attention}"

# Passed, failed, skipped and unfinished tests of a gtest log (the last test
# started and never ended is the one a timeout cut).
summarize_tests() {
  awk '
    /^\[ RUN      \] / { running = $4 }
    /^\[       OK \] / && / \([0-9]+ ms\)$/ { ok[$4] = 1; running = "" }
    /^\[  SKIPPED \] / && / \([0-9]+ ms\)$/ { skipped[$4] = 1; running = "" }
    /^\[  FAILED  \] / && / \([0-9]+ ms\)$/ { name = $4; sub(/,$/, "", name); failed[name] = 1; running = "" }
    END {
      for (t in ok) n_ok++
      for (t in skipped) n_skip++
      list = ""
      for (t in failed) { n_fail++; list = list (list == "" ? "" : ":") t }
      printf "%d\t%d\t%d\t%s\t%s\n", n_ok, n_fail, n_skip, list, running
    }' "$1"
}

# The first lines of each failure in a gtest log.
failure_lines() {
  awk '
    /^\[ RUN      \] / { name = $4; n = 0; next }
    /^\[/ { next }
    name != "" && n < 4 && ($0 ~ /Failure|Expected|Which is|error|Error/) { print name ": " $0; n++ }' "$1" | head -40
}

step_tests() {  # step_tests STEP FILTER CAP
  local step=$1 filter=$2 cap
  cap=$(cap_for "$3")
  ((cap < 5)) && { record "$step" skipped-time 0 "$filter" "no time left"; return; }
  local log=$work/$step.log t0=$SECONDS
  run_capped "$cap" "$log" "$bin/inferlab_gpu_tests" --gtest_filter="$filter" --gtest_color=no
  local rc=$?
  { echo "===== $step (filter $filter, exit $rc)"; cat "$log"; } >>"$out/tests.log"
  IFS=$'\t' read -r n_ok n_fail n_skip failed running < <(summarize_tests "$log")
  local status=passed detail=""
  if ((rc == 124 || rc == 137)); then
    status=timeout
    detail=$filter  # the whole group again
  elif ((n_fail > 0 || rc != 0)); then
    status=failed
    detail=${failed:-$filter}
  fi
  record "$step" "$status" $((SECONDS - t0)) "$detail" \
    "${n_ok:-0} passed, ${n_fail:-0} failed, ${n_skip:-0} skipped${running:+, cut in $running}"
  if [[ $status != passed ]]; then
    { echo; echo "### $step: first lines of the failures"; echo '```'; failure_lines "$log"; echo '```'; } >>"$summary"
  fi
}

# step_bench STEP CAP FILE COMMAND...: a benchmark's output into FILE. Without
# a GPU it must stop at "no GPU", which shows its arguments were accepted.
step_bench() {
  local step=$1 cap file=$out/$3
  cap=$(cap_for "$2")
  shift 3
  ((cap < 5)) && { record "$step" skipped-time 0 "" "no time left"; return; }
  local t0=$SECONDS log=$work/$step.log
  echo "===== $step: $*" >>"$file"
  run_capped "$cap" "$log" "$@"
  local rc=$?
  cat "$log" >>"$file"
  local status=passed
  if ((gpu == 0)); then
    grep -qiE "no (CUDA )?GPU|no module named 'torch'|CUDA is not available" "$log" && status=rehearsed || status=failed
  elif ((rc == 124 || rc == 137)); then
    status=timeout
  elif ((rc != 0)); then
    status=failed
  fi
  record "$step" "$status" $((SECONDS - t0)) "" "$(tail -1 "$log" | cut -c1-120)"
}

run_step() {
  case $1 in
    ldd) step_ldd ;;
    tests-ops) step_tests tests-ops "${2:-$filter_ops}" 45 ;;
    tests-attention) step_tests tests-attention "${2:-$filter_attention}" 60 ;;
    tests-engine) step_tests tests-engine "${2:-$filter_engine}" 75 ;;
    bench-attention)
      step_bench bench-attention 45 bench_attention.md "$bin/bench_cuda_attention" --mode all --reps 20 --peak-gbs "$peak_gbs" ;;
    bench-sdpa)
      step_bench bench-sdpa 30 bench_attention.md python3 "$root/scripts/bench_torch_sdpa.py" --mode all --reps 20 \
        --peak-gbs "$peak_gbs" ;;
    bench-decode)
      step_bench bench-decode 35 bench_decode.md "$bin/bench_cuda_decode" --preset llama2-7b-128k \
        --contexts 1024,4096,16384,32768 --steps 16 --peak-gbs "$peak_gbs" ;;
    bench-kv) step_bench bench-kv 40 bench_kv.md "$bin/bench_cuda_kv_methods" --preset llama2-7b-128k --context 32768 ;;
    queue)
      local q
      for q in "$root"/scripts/gpu-queue/*.sh; do
        [[ -f $q ]] || continue
        local cap
        cap=$(awk '/^# cap: [0-9]+/ {print $3; exit}' "$q")
        step_bench "queue:$(basename "$q" .sh)" "${cap:-30}" queue.log bash "$q" "$bin"
      done ;;
    *) echo "gpu-validate: unknown step $1" >&2; return 2 ;;
  esac
}

all_steps=(ldd tests-ops tests-attention tests-engine bench-attention bench-sdpa bench-decode bench-kv queue)
mode=${1:-all}
case $mode in
  all)
    for s in "${all_steps[@]}"; do run_step "$s"; done ;;
  failed)
    last=${INFERLAB_GPU_LAST:-$root/results/gpu/latest/steps.tsv}
    [[ -f $last ]] || { echo "gpu-validate: no previous run's steps.tsv at $last" >&2; exit 2; }
    run_step ldd
    queue_done=0
    while IFS=$'\t' read -r step status _ detail; do
      [[ $step == ldd || $status == passed || $status == rehearsed ]] && continue
      if [[ $step == tests-* ]]; then
        run_step "$step" "$detail" </dev/null
      elif [[ $step == queue:* ]]; then
        ((queue_done)) || run_step queue </dev/null
        queue_done=1
      else
        run_step "$step" </dev/null
      fi
    done < <(awk -F'\t' '!seen[$1]++' "$last") ;;
  *)
    for s in "$@"; do run_step "$s"; done ;;
esac
echo >>"$summary"
echo "Total: $((SECONDS - start)) s." >>"$summary"
cat "$summary"
# Failures are in the record; the run itself succeeded if it got this far.
exit 0
