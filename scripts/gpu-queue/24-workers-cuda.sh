# cap: 40
# Issue 24 (reliability): runs on the CUDA backend inside worker processes,
# under the worker's RLIMIT_DATA memory limit (the CUDA driver maps large
# address ranges; this shows whether its start-up fits under the limit). A
# small synthetic model (preset small: 64-dim heads, which the CUDA kernels
# take; tiny's 16-dim heads they refuse), a 256-token perplexity on the built-in text: dense,
# Quest and H2O, once at the default limit (90% of memory) and once at 4 GiB.
# Expected: every run "finished"; a CUDA start-up refused by the limit shows
# as a failed run naming the memory limit.
set -u
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin/inferlab" model synth --preset small -o "$work/small.gguf" || exit 1
for limit in 0 4096; do
  {
    echo '[experiment]'
    echo "name = \"gpu-workers-$limit\""
    echo 'backend = "cuda"'
    ((limit > 0)) && echo "memory_limit_mb = $limit"
    echo '[model]'
    echo "name = \"$work/small.gguf\""
    echo '[task]'
    echo 'type = "perplexity"'
    echo 'path = "kjv"'
    echo 'length = 256'
    echo 'samples = 2'
    echo '[[method]]'
    echo 'plugin = "quest"'
    echo 'token_budget = 64'
    echo '[[method]]'
    echo 'plugin = "h2o"'
    echo 'heavy = 32'
    echo 'recent = 32'
  } >"$work/w.toml"
  echo "## memory_limit_mb = $limit (0: the default)"
  timeout 18 "$bin/inferlab" run "$work/w.toml" --db "$work/w.db" 2>&1 | tail -6
  "$bin/inferlab" query --db "$work/w.db" \
    "SELECT e.name, r.label, r.status, substr(r.error, 1, 100) FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE e.name = 'gpu-workers-$limit'" 2>&1
done
