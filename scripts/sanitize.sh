#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (built
# with clang, CUDA off), then each fuzz target (fuzz/) for a bounded time from
# its committed seed corpus. scripts/test.sh runs it after the main suite, so CI
# does too. A crash leaves its input under <build>/fuzz-artifacts/; copy it into
# fuzz/regressions/<target>/ (every build replays those) and fix the parser.
#   INFERLAB_SANITIZE_BUILD_DIR (default build-asan), INFERLAB_FUZZ_SECONDS per
#   target (default 30; 0 skips fuzzing), INFERLAB_BUILD_JOBS.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
build_dir="${INFERLAB_SANITIZE_BUILD_DIR:-build-asan}"
fuzz_seconds="${INFERLAB_FUZZ_SECONDS:-30}"
jobs="${INFERLAB_BUILD_JOBS:-$(nproc)}"

if ! command -v clang++ >/dev/null 2>&1; then
    echo "sanitize: clang++ not found; run scripts/install-deps.sh" >&2
    exit 1
fi

CC=clang CXX=clang++ cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DINFERLAB_CUDA=OFF \
    -DINFERLAB_SANITIZE=ON -DINFERLAB_FUZZ=ON -DINFERLAB_BENCHMARKS=OFF -DINFERLAB_CPU_ARCH=x86-64-v3 \
    -DINFERLAB_WERROR="${INFERLAB_WERROR:-OFF}"
cmake --build "$build_dir" -j"$jobs"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$build_dir" --output-on-failure -j"${INFERLAB_TEST_JOBS:-2}" -L cpu

if [[ "$fuzz_seconds" == "0" ]]; then
    echo "sanitize: fuzzing skipped (INFERLAB_FUZZ_SECONDS=0)"
    exit 0
fi
artifacts="$build_dir/fuzz-artifacts"
mkdir -p "$artifacts"
for target in gguf experiment_config tokenizer minference_patterns safetensors lora_adapter; do
    work="$build_dir/fuzz-corpus/$target"  # new inputs go here, never into the repository
    mkdir -p "$work"
    seeds=("fuzz/corpus/$target")
    case "$target" in
        experiment_config) seeds+=(experiments) ;;  # the shipped configs
        gguf)  # a whole (tiny) model as the framework writes it; models stay out of git
            "$build_dir/bin/inferlab" model synth --preset tiny --layers 1 --type q8_0 \
                -o "$work/synthetic_tiny_1layer_q8_0.gguf" >/dev/null ;;
    esac
    log="$build_dir/fuzz-$target.log"  # libFuzzer reports every new input: keep it out of the CI log
    echo "sanitize: fuzzing $target for ${fuzz_seconds}s (log: $log)"
    if ! "$build_dir/bin/fuzz_$target" -max_total_time="$fuzz_seconds" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=2048 -artifact_prefix="$artifacts/$target-" "$work" "${seeds[@]}" >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "sanitize: fuzz_$target failed; the input is under $artifacts/" >&2
        exit 1
    fi
    grep -E "^Done [0-9]+ runs|^stat::(number_of_executed_runs|peak_rss_mb)" "$log" || true
done
echo "sanitize: sanitizer tests and fuzzing passed"
