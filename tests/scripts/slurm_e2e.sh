#!/usr/bin/env bash
# `inferlab slurm --submit` on a real one-node Slurm cluster started here: the
# job array runs a small grid on a synthetic model in 3 shards, the merge job
# joins their databases, and the merged database holds the same runs, metric
# values (all but timings and memory peaks) and samples as a local
# `inferlab run` of the same grid.
#   slurm_e2e.sh INFERLAB WORKDIR
# Needs root and Debian's slurm-wlm and munge (slurmctld, slurmd, sbatch, munged);
# exits 77 (skip) without them. Starts munged, slurmctld and slurmd itself (no
# systemd), on ports of its own, with their state in a temporary folder, and
# stops them (and cancels its jobs) on every exit.
set -euo pipefail
cli="${1:?usage: slurm_e2e.sh INFERLAB WORKDIR}"
work="${2:?usage: slurm_e2e.sh INFERLAB WORKDIR}"
cli="$(cd "$(dirname "$cli")" && pwd)/$(basename "$cli")"

skip() { echo "SKIP: $*"; exit 77; }
[[ "$(id -u)" -eq 0 ]] || skip "needs root (it starts slurmctld, slurmd and munged)"
for tool in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool not found (Debian packages slurm-wlm and munge)"
done

started=$(date +%s)
state="$(mktemp -d /tmp/inferlab-slurm.XXXXXX)"  # short: munge's socket path must fit a sockaddr_un
chmod 0700 "$state"
pids=()
jobs_submitted=""
cleanup() {
    local rc=$?
    if [[ -n "$jobs_submitted" ]]; then scancel $jobs_submitted >/dev/null 2>&1 || true; sleep 1; fi
    for ((k = ${#pids[@]} - 1; k >= 0; k--)); do kill "${pids[k]}" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ "$rc" -ne 0 && "$rc" -ne 77 ]]; then
        for log in slurmctld.log slurmd.log munged.log; do
            [[ -f "$state/$log" ]] && { echo "--- $log (last 20 lines)"; tail -n 20 "$state/$log"; }
        done
    fi
    rm -rf "$state"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*"; exit 1; }

# ---- munge, with a key of its own --------------------------------------------
dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 status=none
chmod 0400 "$state/munge.key"
munged --foreground --force --key-file="$state/munge.key" --socket="$state/munge.socket" \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munged.seed" \
    >"$state/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [[ -S "$state/munge.socket" ]] && break; sleep 0.1; done
[[ -S "$state/munge.socket" ]] || { cat "$state/munged.out"; fail "munged did not start"; }

# ---- slurm.conf for this one node ---------------------------------------------
cpus=$(nproc)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 256 ))
base=$(( 20000 + ($$ % 2000) * 2 ))
export SLURM_CONF="$state/slurm.conf"
: >"$state/plugstack.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=inferlab-e2e
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge.socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
PlugStackConfig=$state/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p "$state/ctld" "$state/slurmd"

slurmctld -D -c -i -f "$SLURM_CONF" >"$state/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" >"$state/slurmd.out" 2>&1 &
pids+=($!)
node_state=""
for _ in $(seq 120); do
    node_state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
    [[ "$node_state" == "idle" ]] && break
    sleep 0.25
done
[[ "$node_state" == "idle" ]] || { cat "$state/slurmctld.out" "$state/slurmd.out"; fail "the node is '$node_state', not idle, after 30 s"; }
echo "slurm $(sinfo -V | awk '{print $2}'): node localhost idle ($cpus CPUs, $mem_mb MB) after $(( $(date +%s) - started )) s"

# ---- a small grid on a synthetic model, in folders with spaces -----------------
rm -rf "$work"
mkdir -p "$work/config dir"
cd "$work"
export OMP_NUM_THREADS=1  # the same arithmetic locally and in the jobs (sbatch passes the environment on)
"$cli" model synth --preset tiny -o "config dir/tiny.gguf" >/dev/null
for i in $(seq 200); do echo "The lighthouse keeper counted $i ships passing the northern rocks."; done \
    >"config dir/corpus.txt"
cat >"config dir/grid.toml" <<'TOML'
[experiment]
name = "slurm-e2e"
seed = 1
backend = "cpu"

[model]
name = "tiny.gguf"

[[task]]
type = "perplexity"
path = "corpus.txt"
length = 32
samples = 2

[[task]]
type = "passkey"
lengths = [192]
depths = [0.5]
samples = 2

[[method]]
plugin = "streamingllm"
name = "streaming"
sink_tokens = 4
window = [12, 28]
TOML

"$cli" run "config dir/grid.toml" --db local.db >local.out 2>local.err || { cat local.out local.err; fail "local run"; }

# Bad input fails before anything is written.
if "$cli" slurm "config dir/grid.toml" --array 0 --out never >bad.out 2>&1; then fail "--array 0 accepted"; fi
[[ ! -e never ]] || fail "--array 0 wrote scripts"

"$cli" slurm "config dir/grid.toml" --array 3 --partition debug --time 00:05:00 --cpus-per-task 1 \
    --db "final dbs/merged.db" --out "slurm jobs" --submit >submit.out 2>&1 || { cat submit.out; fail "inferlab slurm --submit"; }
cat submit.out
read -r array_job merge_job < <(sed -n 's/^submitted array job \([0-9]*\) .*merge job \([0-9]*\) .*/\1 \2/p' submit.out)
[[ -n "${array_job:-}" && -n "${merge_job:-}" ]] || fail "no job ids in the output of inferlab slurm"
jobs_submitted="$array_job $merge_job"
scontrol show job "$merge_job" | grep -q "Dependency=afterany:${array_job}" || fail "merge job $merge_job does not depend on afterany:$array_job"

waited=0
while [[ -n "$(squeue -h -j "$array_job,$merge_job" -o '%i' 2>/dev/null)" ]]; do
    ((waited < 180)) || fail "jobs still queued or running after 180 s: $(squeue -h -j "$array_job,$merge_job")"
    sleep 1
    waited=$((waited + 1))
done
jobs_submitted=""
echo "array and merge jobs ended after ${waited} s"

job_states() { scontrol show job "$1" | grep -o 'JobState=[A-Z_]* .*\|ExitCode=[0-9:]*' | tr '\n' ' '; }
tasks_completed=$(scontrol show job "$array_job" | grep -c 'JobState=COMPLETED' || true)
[[ "$tasks_completed" -eq 3 ]] || { cat "slurm jobs/logs/"*; fail "$tasks_completed of 3 array tasks COMPLETED: $(job_states "$array_job")"; }
scontrol show job "$merge_job" | grep -q 'JobState=COMPLETED' || { cat "slurm jobs/logs/"*; fail "merge job: $(job_states "$merge_job")"; }
for i in 1 2 3; do [[ -f "final dbs/merged.shards/shard-$i-of-3.db" ]] || fail "shard database $i missing"; done
cat "slurm jobs/logs/"merge-*.log

# ---- the merged database equals the local run -----------------------------------
runs_sql="SELECT hash, label, task, status FROM runs ORDER BY hash"
metrics_sql="SELECT r.hash, m.name, printf('%.17g', m.value) FROM runs r JOIN metrics m ON m.run_id = r.id
  WHERE m.name NOT LIKE '%\_ms' ESCAPE '\\' AND m.name NOT LIKE '%per\_s' ESCAPE '\\'
    AND m.name NOT IN ('peak_rss_bytes') ORDER BY r.hash, m.name"
samples_sql="SELECT r.hash, s.idx, s.input_tokens, s.expected, s.produced, s.correct FROM runs r
  JOIN samples s ON s.run_id = r.id ORDER BY r.hash, s.idx"
for what in runs metrics samples; do
    sql_var="${what}_sql"
    "$cli" query "${!sql_var}" --db local.db --csv >"local-$what.csv"
    "$cli" query "${!sql_var}" --db "final dbs/merged.db" --csv >"merged-$what.csv"
    diff "local-$what.csv" "merged-$what.csv" >/dev/null \
        || { diff "local-$what.csv" "merged-$what.csv" | head -20; fail "$what of the merged database differ from the local run's"; }
done
runs=$(($(wc -l <local-runs.csv) - 1))
metrics=$(($(wc -l <local-metrics.csv) - 1))
samples=$(($(wc -l <local-samples.csv) - 1))
[[ "$runs" -eq 6 ]] || fail "expected 6 runs, the local database has $runs"
[[ "$(grep -c ',finished$' local-runs.csv)" -eq 6 ]] || fail "not every run finished"
"$cli" run "config dir/grid.toml" --db "final dbs/merged.db" --dry-run | grep -q pending && fail "the merged database lacks runs"
echo "merged database equals the local run: $runs runs, $metrics metric values, $samples samples;" \
    "$(( $(date +%s) - started )) s in all"
