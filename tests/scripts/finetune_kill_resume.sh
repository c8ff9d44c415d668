#!/usr/bin/env bash
# `inferlab finetune` killed with SIGKILL mid-training and run again resumes
# from its checkpoint and ends with the same adapter file, byte for byte, as an
# uninterrupted run of the same config (same thread count), and its training
# curve in the results database holds each step once.
#   finetune_kill_resume.sh INFERLAB WORKDIR
set -euo pipefail
cli="${1:?usage: finetune_kill_resume.sh INFERLAB WORKDIR}"
work="${2:?usage: finetune_kill_resume.sh INFERLAB WORKDIR}"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
export OMP_NUM_THREADS=2

"$cli" model synth --preset tiny -o tiny.gguf --type f32 >/dev/null
for _ in $(seq 80); do echo "the cat sat on the mat and the dog sat on the log."; done > train.txt
for name in straight killed; do
    cat > "$name.toml" <<TOML
[model]
name = "tiny.gguf"
[finetune]
data = "train.txt"
targets = "all-linear"
r = 4
steps = 16
batch = 2
seq_len = 32
lr = 0.005
dropout = 0.05
grad_accum = 2
schedule = "cosine"
warmup_steps = 2
checkpoint_every = 5
log_every = 100
output = "$name/adapter"
TOML
done

"$cli" finetune straight.toml --no-db >/dev/null 2>straight.log
set +e
INFERLAB_FINETUNE_KILL_AFTER_STEP=12 "$cli" finetune killed.toml --db killed.db >/dev/null 2>killed.log
rc=$?
set -e
if [[ "$rc" -ne 137 ]]; then
    echo "FAIL: the run was to die of SIGKILL after step 12 (exit 137), exited $rc"; cat killed.log; exit 1
fi
[[ -f killed/adapter.checkpoint ]] || { echo "FAIL: no checkpoint left by the killed run"; exit 1; }
[[ ! -e killed/adapter ]] || { echo "FAIL: the killed run wrote an adapter"; exit 1; }
"$cli" finetune killed.toml --db killed.db >/dev/null 2>resumed.log
grep -q "resuming from step 10 of 16" resumed.log || { echo "FAIL: did not resume from step 10"; cat resumed.log; exit 1; }
cmp straight/adapter/adapter_model.safetensors killed/adapter/adapter_model.safetensors \
    || { echo "FAIL: the resumed adapter differs from the uninterrupted one"; exit 1; }
cmp straight/adapter/adapter_config.json killed/adapter/adapter_config.json
steps=$("$cli" query "SELECT count(*) || '/' || count(DISTINCT step) || '/' || max(step) FROM finetune_steps" \
        --db killed.db --csv | tail -1)
[[ "$steps" == "16/16/16" ]] || { echo "FAIL: training curve rows (count/distinct/max) $steps, expected 16/16/16"; exit 1; }
[[ ! -e killed/adapter.checkpoint ]] || { echo "FAIL: the checkpoint outlived the finished run"; exit 1; }
echo "killed after step 12, resumed from step 10: the adapter equals the uninterrupted run's, byte for byte"
