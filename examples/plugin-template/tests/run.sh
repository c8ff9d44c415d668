#!/usr/bin/env bash
# The template plugin through the installed host: a synthetic model, the
# fidelity task (a 128-token prompt, then 16 decode steps teacher-forced on
# dense's tokens), dense and recent_window at two windows. Checks
# that every run finished and that the plugin kept at most `window` keys per
# decode step (the engine's keys_read_per_step), while dense read more.
# usage: run.sh INFERLAB PLUGIN_DIR WORK_DIR
set -euo pipefail
inferlab=$1 plugins=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
"$inferlab" model synth --preset tiny -o "$work/tiny.gguf" >/dev/null
cat >"$work/grid.toml" <<TOML
[experiment]
name = "template"
[model]
name = "$work/tiny.gguf"
threads = 1
[task]
type = "fidelity"
path = "kjv"
prompt_tokens = 128
new_tokens = 16
samples = 1
[[method]]
plugin = "recent_window"
window = [16, 64]
TOML
INFERLAB_PLUGIN_PATH=$plugins "$inferlab" run "$work/grid.toml" --db "$work/results.db"
query() { "$inferlab" query --db "$work/results.db" --csv "$1" | tail -n +2; }
fail() { echo "template test: $*" >&2; exit 1; }
[[ $(query "SELECT count(*) FROM runs WHERE status = 'finished'") == 3 ]] || fail "not every run finished"
dense=$(query "SELECT value FROM run_metrics WHERE label = 'dense' AND metric = 'keys_read_per_step'")
for w in 16 64; do
  keys=$(query "SELECT value FROM run_metrics WHERE label = 'recent_window window=$w' AND metric = 'keys_read_per_step'")
  dropped=$(query "SELECT value FROM run_metrics WHERE label = 'recent_window window=$w' AND metric = 'plugin.tokens_dropped'")
  echo "window $w: keys read per step $keys (dense $dense), tokens dropped $dropped"
  awk -v k="$keys" -v w="$w" -v d="$dense" -v x="$dropped" 'BEGIN { exit !(k <= w + 1 && k < d && x > 0) }' ||
    fail "window $w read $keys keys per step (dense $dense), dropped $dropped"
done
echo "template test: passed"
