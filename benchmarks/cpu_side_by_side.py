#!/usr/bin/env python3
"""inferlab's CPU engine and llama.cpp side by side, on one model file, in one sitting.

Runs inferlab's benchmark binary (bench_cpu_model, a subprocess per repeat) and
llama.cpp (through llama-cpp-python, the model loaded once and kept) on the same
GGUF file, with the same thread count and the same lengths, alternating:
inferlab run 1, llama.cpp run 1, inferlab run 2, ... so that a change in the
machine's state (other load, heat, frequency) hits both sides alike. Prints a
markdown table of the medians and the ratio inferlab / llama.cpp.

What is timed, on both sides:
  prefill N   one evaluation of N random tokens from an empty cache
              (llama.cpp: n_batch >= N, so one llama_decode; n_ubatch 512 as llama-bench);
  decode @ C  C random tokens prefilled untimed, then --decode-steps single-token
              evaluations timed; tokens/s = steps / seconds.
Both sides store the KV cache in --kv-dtype (default f32; f16 is llama.cpp's own
default), llama.cpp with flash attention off,
n_threads = n_threads_batch = --threads. Each inferlab run is one process
(`bench_cpu_model --repeats 1`); its timings exclude the model load. Each run
starts with an untimed warm-up, a prefill of --inferlab-warmup tokens and a decode
at that context (their rows are dropped), since a process's first prefill can be
several times slower; the llama.cpp model, loaded once, is warmed up likewise.

Usage:
  bash scripts/setup-reference.sh && bash scripts/build.sh
  .venv-ref/bin/python tests/reference/convert_gguf_f32.py   # ...SmolLM2-135M-Instruct.F32.gguf
  .venv-ref/bin/python benchmarks/cpu_side_by_side.py [--model FILE.gguf] [--threads 2]
      [--prefill 2048,4000] [--decode 15,2048,4000] [--decode-steps 32] [--repeats 3]
      [--bench build-cpu/bin/bench_cpu_model] [--inferlab-args "--weights file"] [--kv-dtype f16]
      [--out report.md]
(plain python3 works too: the script restarts itself under .venv-ref/bin/python.)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_PYTHON = REPO / ".venv-ref" / "bin" / "python"
MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
DEFAULT_MODEL = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BENCH = REPO / "build-cpu" / "bin" / "bench_cpu_model"
PROG = "cpu_side_by_side"
REEXEC_ENV = "INFERLAB_SIDE_BY_SIDE_REEXEC"
ref = None  # benchmarks/llamacpp_reference.py, imported in main() once llama_cpp is known to be there


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"GGUF file (default {DEFAULT_MODEL})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int_list, default=[2048, 4000], metavar="N,N",
                   help="prompt lengths (default 2048,4000)")
    p.add_argument("--decode", type=int_list, default=[15, 2048, 4000], metavar="C,C",
                   help="contexts at which decode is timed (default 15,2048,4000)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (default 3)")
    p.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help=f"bench_cpu_model binary (default {DEFAULT_BENCH})")
    p.add_argument("--inferlab-args", action="append", default=[], metavar="STR",
                   help="extra arguments for bench_cpu_model, split as a shell would; repeatable. "
                        "A single flag needs the = form: --inferlab-args=--flag")
    p.add_argument("--inferlab-warmup", type=int, default=16, metavar="N",
                   help="each inferlab run starts with an untimed prefill of N tokens and decode at "
                        "context N (--decode-steps steps), rows dropped (default 16; 0: none)")
    p.add_argument("--kv-dtype", choices=["f32", "f16"], default="f32",
                   help="KV cache element type on both sides (default f32)")
    p.add_argument("--n-ubatch", type=int, default=512, help="llama.cpp n_ubatch (default 512, as llama-bench)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other CPU load to stop (default: do not wait)")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    if args.threads <= 0 or args.decode_steps <= 0 or args.repeats <= 0:
        p.error("--threads, --decode-steps and --repeats must be positive")
    args.model = args.model.expanduser()
    args.bench = args.bench.expanduser()
    args.extra = [a for s in args.inferlab_args for a in shlex.split(s)]
    return args


def llama_cpp_importable() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def check_setup(args: argparse.Namespace) -> None:
    """Exits naming everything missing; restarts under .venv-ref when this Python lacks llama_cpp."""
    missing = []
    have_llama = llama_cpp_importable()
    in_venv = Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve()
    can_reexec = (not have_llama and not in_venv and os.environ.get(REEXEC_ENV) is None
                  and os.access(VENV_PYTHON, os.X_OK))
    if not have_llama and not can_reexec:
        missing.append(f"llama-cpp-python (not importable by {sys.executable}; "
                       f"run `bash scripts/setup-reference.sh`, then use {VENV_PYTHON})")
    if not (args.bench.is_file() and os.access(args.bench, os.X_OK)):
        missing.append(f"bench binary {args.bench} (run `bash scripts/build.sh`, or pass --bench PATH)")
    if not args.model.is_file():
        missing.append(f"model file {args.model} (run `bash scripts/fetch-model.sh`; "
                       "tests/reference/convert_gguf_f32.py writes the F32 copy)")
    if missing:
        sys.exit(f"{PROG}: missing:\n  " + "\n  ".join(missing))
    if can_reexec:
        env = dict(os.environ, **{REEXEC_ENV: "1"})
        os.execve(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]], env)


class OtherLoad:
    """Share of the machine's CPU time used by processes other than this one and
    its waited-for children (the bench subprocess) while the block ran.
    llamacpp_reference.OtherLoad counts only this process's own time, so it
    would count the inferlab subprocess as 'other'."""

    def __enter__(self) -> "OtherLoad":
        self.start = ref.cpu_jiffies(), sum(os.times()[:4])
        return self

    def __exit__(self, *exc) -> None:
        (busy0, total0), own0 = self.start
        busy1, total1 = ref.cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:4]) - own0
        self.total_s = (total1 - total0) / hz
        self.other_s = max(0.0, (busy1 - busy0) / hz - own)
        self.fraction = self.other_s / max(1e-9, self.total_s)


# ---------------------------------------------------------------- inferlab side

PREFILL_ROW = re.compile(r"^\|\s*prefill (\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*$")
DECODE_ROW = re.compile(r"^\|\s*decode at context (\d+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*$")


def bench_command(args: argparse.Namespace) -> list[str]:
    warm = [args.inferlab_warmup] if args.inferlab_warmup > 0 else []
    return [str(args.bench), "--model", str(args.model.resolve()),
            "--prefill", ",".join(map(str, warm + args.prefill)),
            "--decode", ",".join(map(str, warm + args.decode)),
            "--decode-steps", str(args.decode_steps), "--repeats", "1",
            "--threads", str(args.threads), "--kv-dtype", args.kv_dtype, *args.extra]


def run_inferlab(args: argparse.Namespace, cmd: list[str]) -> tuple[dict[str, float], list[str]]:
    """One bench_cpu_model process: {test key: tokens/s} and its header lines."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{PROG}: bench_cpu_model failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                 f"{proc.stderr.strip()}\n{proc.stdout.strip()}")
    prefill_rows, decode_rows, header = [], [], []
    for line in proc.stdout.splitlines():
        if m := PREFILL_ROW.match(line.strip()):
            prefill_rows.append((int(m[1]), int(m[2]), float(m[3]), float(m[4])))
        elif m := DECODE_ROW.match(line.strip()):
            decode_rows.append((int(m[1]), int(m[2]), float(m[3]), float(m[4])))
        elif line.startswith(("model:", "cpu:")):
            header.append(line.strip())
    if args.inferlab_warmup > 0:  # drop the warm-up rows
        prefill_rows, decode_rows = prefill_rows[1:], decode_rows[1:]
    got_p = [r[0] for r in prefill_rows]
    got_d = [r[0] for r in decode_rows]
    if got_p != args.prefill or got_d != args.decode or any(r[1] != args.decode_steps for r in decode_rows):
        sys.exit(f"{PROG}: unexpected bench_cpu_model output (prefill rows {got_p}, decode rows {got_d}, "
                 f"wanted {args.prefill} and {args.decode} x {args.decode_steps} steps):\n{proc.stdout}")
    # The tokens/s column is computed from the unrounded time; the seconds column has 3 decimals.
    result = {f"prefill {n}": tps for n, _, _, tps in prefill_rows}
    result.update({f"decode {c}": tps for c, _, _, tps in decode_rows})
    return result, header


# --------------------------------------------------------------- llama.cpp side

def load_llama(args: argparse.Namespace):
    import llama_cpp
    n_ctx = max(max(args.prefill), max(args.decode) + args.decode_steps)
    n_batch = max(max(args.prefill), max(args.decode))  # every prefill is one eval, one llama_decode
    kv_type = getattr(llama_cpp, "GGML_TYPE_F16", 1) if args.kv_dtype == "f16" else getattr(llama_cpp, "GGML_TYPE_F32", 0)
    llm = llama_cpp.Llama(str(args.model), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(args.n_ubatch, n_batch),
                          n_threads=args.threads, n_threads_batch=args.threads,
                          type_k=kv_type, type_v=kv_type, flash_attn=False, logits_all=False, verbose=False)
    # Warm-up as inferlab's (page in weights, first batch and single-token graphs).
    warm = max(1, args.inferlab_warmup)
    llm.reset()
    llm.eval(ref.token_ids(warm, llm.n_vocab(), seed=0))
    for tok in ref.token_ids(4, llm.n_vocab(), seed=1):
        llm.eval([tok])
    return llm, {"n_ctx": llm.n_ctx(), "n_batch": n_batch, "n_ubatch": min(args.n_ubatch, n_batch)}


def run_llama(args: argparse.Namespace, llm) -> dict[str, float]:
    result = {}
    for n in args.prefill:
        result[f"prefill {n}"] = n / ref.time_prefill(llm, n, 1)[0]
    for c in args.decode:
        result[f"decode {c}"] = 1.0 / ref.time_decode(llm, c, args.decode_steps, 1)[0]
    return result


# ------------------------------------------------------------------- reporting

def test_keys(args: argparse.Namespace) -> list[tuple[str, str]]:
    keys = [(f"prefill {n}", f"prefill {n:,} tokens") for n in args.prefill]
    keys += [(f"decode {c}", f"decode after {c:,} tokens" if c < 512 else f"decode at {c:,}")
             for c in args.decode]
    return keys


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def median_table(args, runs_il, runs_ll) -> str:
    lines = ["| | inferlab | llama.cpp | ratio |", "|---|---:|---:|---:|"]
    for i, (key, label) in enumerate(test_keys(args)):
        a = statistics.median(r[key] for r in runs_il)
        b = statistics.median(r[key] for r in runs_ll)
        unit = " tok/s" if i == 0 else ""
        lines.append(f"| {label} | {fmt_rate(a)}{unit} | {fmt_rate(b)} | {a / b:.2f}× |")
    return "\n".join(lines)


def raw_table(args, runs_il, runs_ll) -> str:
    n = len(runs_il)
    head = "| test | " + " | ".join([f"inferlab #{i + 1}" for i in range(n)] + [f"llama.cpp #{i + 1}" for i in range(n)]) + " |"
    lines = [head, "|---|" + "---:|" * (2 * n)]
    for key, label in test_keys(args):
        cells = [f"{r[key]:.1f}" for r in runs_il] + [f"{r[key]:.1f}" for r in runs_ll]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{head}" + (" (dirty: uncommitted changes to tracked files)" if dirty else " (clean)")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout?)"


def sha256_prefix(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:n]


def main() -> int:
    args = parse_args(sys.argv[1:])
    check_setup(args)

    global ref
    sys.path.insert(0, str(BENCH_DIR))
    import llamacpp_reference as ref  # noqa: E402  (after the venv check: it exits without llama_cpp)
    import llama_cpp

    started = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join([sys.executable, *sys.argv])
    model_sha = sha256_prefix(args.model)
    cmd = bench_command(args)
    print(f"{PROG}: {args.model.name} ({model_sha}), {args.threads} threads, {args.repeats} repeats\n"
          f"  inferlab: {shlex.join(cmd)}", file=sys.stderr)

    if args.wait_idle > 0:
        ref.wait_for_idle(args.wait_idle)

    t0 = time.perf_counter()
    llm, llama_settings = load_llama(args)
    print(f"  llama.cpp {llama_cpp.__version__}: loaded in {time.perf_counter() - t0:.1f} s, {llama_settings}",
          file=sys.stderr)

    runs_il, runs_ll, loads_il, loads_ll, header = [], [], [], [], []
    with OtherLoad() as total_load:
        for rep in range(args.repeats):
            with OtherLoad() as load:
                result, header = run_inferlab(args, cmd)
            runs_il.append(result)
            loads_il.append(load.fraction)
            print(f"  run {rep + 1}/{args.repeats} inferlab:  "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result.items()) + f" tok/s (other load {load.fraction:.0%})",
                  file=sys.stderr)
            with OtherLoad() as load:
                result = run_llama(args, llm)
            runs_ll.append(result)
            loads_ll.append(load.fraction)
            print(f"  run {rep + 1}/{args.repeats} llama.cpp: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result.items()) + f" tok/s (other load {load.fraction:.0%})",
                  file=sys.stderr)
    del llm

    table = median_table(args, runs_il, runs_ll)
    other = total_load.fraction
    worst = max(loads_il + loads_ll)
    warning = ""
    if other > 0.05 or worst > 0.05:
        warning = (f"**warning:** other processes used {other:.0%} of the CPU during the run "
                   f"(worst single run {worst:.0%}); the numbers are low and noisy, rerun on an idle machine")

    print(f"\ninferlab vs llama.cpp {llama_cpp.__version__}, {args.model.name}, {args.threads} threads, "
          f"median of {args.repeats} alternating runs\n")
    print(table)
    print(f"\nother processes' CPU share during the run: {other:.1%}")
    if warning:
        print(warning.replace("**", ""))

    if args.out:
        decode_note = (f"decode: prefill C tokens untimed, then {args.decode_steps} single-token steps timed; "
                       "tokens/s = steps / seconds")
        report = [
            "# inferlab vs llama.cpp on the CPU, side by side",
            "",
            f"- date (UTC): {started.strftime('%Y-%m-%d %H:%M:%S')}",
            f"- CPU: {ref.cpu_name()} ({os.cpu_count()} logical CPUs), threads: {args.threads}",
            f"- model: {args.model.resolve()} (sha256 {model_sha}…, {args.model.stat().st_size / 2**20:.1f} MiB)",
            f"- inferlab: git {git_state()}; `{shlex.join(cmd)}`",
            *(f"  - bench header: {h}" for h in header),
            f"- llama.cpp: llama-cpp-python {llama_cpp.__version__}; n_ctx {llama_settings['n_ctx']}, "
            f"n_batch {llama_settings['n_batch']}, n_ubatch {llama_settings['n_ubatch']}, {args.kv_dtype} KV cache, "
            f"flash attention off, n_threads = n_threads_batch = {args.threads}",
            f"- command: `{command}`",
            f"- method: prefill: one evaluation of N random tokens from an empty cache; {decode_note}. "
            f"Runs alternate inferlab, llama.cpp, inferlab, ...; {args.repeats} each; figures are medians; "
            f"ratio = inferlab / llama.cpp. Each inferlab run is one process "
            f"(untimed warm-up: prefill and decode at context {args.inferlab_warmup}); "
            f"the llama.cpp model is loaded once and warmed up the same way.",
            f"- other processes' CPU share during the run: {other:.1%} (per run, inferlab: "
            + ", ".join(f"{x:.0%}" for x in loads_il) + "; llama.cpp: " + ", ".join(f"{x:.0%}" for x in loads_ll) + ")",
            "",
            *( [warning, ""] if warning else [] ),
            "## Medians (tokens/s)",
            "",
            table,
            "",
            "## Every run (tokens/s)",
            "",
            raw_table(args, runs_il, runs_ll),
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))
        print(f"\nreport written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
