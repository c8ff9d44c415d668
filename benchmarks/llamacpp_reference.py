#!/usr/bin/env python3
"""Times llama.cpp (through llama-cpp-python) on this machine, as a reference
for inferlab's own speed numbers.

Measures, per model file:
  prefill tokens/s for a prompt of 512 and of 2048 tokens (from an empty cache);
  decode tokens/s at context 512 and 4096: the cache is filled by an untimed
  prefill, then 64 single-token evaluations are timed (token ids fixed in
  advance, so no sampling is timed, as in greedy decoding).

llama.cpp settings follow llama-bench's defaults (n_batch 2048, n_ubatch 512,
no flash attention), with n_threads = 2 unless --threads says otherwise.

Usage:
  bash scripts/setup-reference.sh
  .venv-ref/bin/python tests/reference/convert_gguf_f32.py     # the F32 copy
  .venv-ref/bin/python benchmarks/llamacpp_reference.py [--models Q4_1.gguf F32.gguf ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("llamacpp_reference: llama-cpp-python is missing; run scripts/setup-reference.sh "
             "and use .venv-ref/bin/python")

MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
DEFAULT_MODELS = [MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf",
                  MODEL_DIR / "SmolLM2-135M-Instruct.F32.gguf"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class OtherLoad:
    """Share of the machine's CPU time that other processes used while the block ran.

    llama.cpp's threads spin while they wait for each other, so on a 2-core
    machine any other load slows it down many times over; this makes that visible.
    """

    def __enter__(self) -> "OtherLoad":
        self.start = cpu_jiffies(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        (busy0, total0), own0 = self.start
        busy1, total1 = cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2]) - own0
        self.fraction = max(0.0, ((busy1 - busy0) / hz - own) / max(1e-9, (total1 - total0) / hz))


def wait_for_idle(max_wait_s: float, threshold: float = 0.05, quiet_samples: int = 3) -> None:
    """Waits up to max_wait_s until other processes have used less than `threshold`
    of the CPU for `quiet_samples` consecutive 3-second samples."""
    deadline = time.monotonic() + max_wait_s
    quiet_samples = quiet_samples if max_wait_s > 0 else 1
    quiet = 0
    while quiet < quiet_samples:
        with OtherLoad() as load:
            time.sleep(3.0)
        quiet = quiet + 1 if load.fraction <= threshold else 0
        if quiet == 0 and time.monotonic() >= deadline:
            print(f"llamacpp_reference: warning: other processes use {load.fraction:.0%} of the CPU; "
                  "the numbers will be low and noisy", file=sys.stderr)
            return
        if quiet == 0:
            print(f"  waiting for an idle machine (other load {load.fraction:.0%})", file=sys.stderr)


def token_ids(n: int, n_vocab: int, seed: int) -> list[int]:
    # Ordinary (non-special) ids; the content does not change the cost.
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, n_vocab, size=n)]


def time_prefill(llm: Llama, n_prompt: int, repetitions: int) -> list[float]:
    tokens = token_ids(n_prompt, llm.n_vocab(), seed=n_prompt)
    seconds = []
    for _ in range(repetitions):
        llm.reset()  # eval() drops cached positions from n_tokens on
        start = time.perf_counter()
        llm.eval(tokens)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_decode(llm: Llama, n_context: int, n_steps: int, repetitions: int) -> list[float]:
    context = token_ids(n_context, llm.n_vocab(), seed=n_context)
    steps = token_ids(n_steps, llm.n_vocab(), seed=n_context + 1)
    per_token = []
    for _ in range(repetitions):
        llm.reset()
        llm.eval(context)  # untimed: fills the cache to n_context
        start = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        per_token.append((time.perf_counter() - start) / n_steps)
    return per_token


def bench_model(path: Path, args: argparse.Namespace) -> list[dict]:
    wait_for_idle(args.wait_idle)
    n_ctx = max(max(args.prefill), max(args.decode) + args.decode_steps) + 64
    llm = Llama(str(path), n_ctx=n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                n_threads=args.threads, n_threads_batch=args.threads,
                logits_all=False, flash_attn=False, verbose=False)
    llm.eval(token_ids(16, llm.n_vocab(), seed=0))  # warm-up: page in weights, build graphs

    rows = []
    for n in args.prefill:
        with OtherLoad() as load:
            seconds = statistics.median(time_prefill(llm, n, args.repetitions))
        rows.append({"model": path.name, "test": f"prefill {n}", "tokens": n,
                     "tokens_per_s": n / seconds, "ms_per_token": 1e3 * seconds / n,
                     "other_load": load.fraction})
        print(f"  {path.name}: prefill {n}: {n / seconds:.1f} tok/s", file=sys.stderr)
    for n in args.decode:
        with OtherLoad() as load:
            seconds = statistics.median(time_decode(llm, n, args.decode_steps, args.repetitions))
        rows.append({"model": path.name, "test": f"decode @ ctx {n}", "tokens": args.decode_steps,
                     "tokens_per_s": 1.0 / seconds, "ms_per_token": 1e3 * seconds,
                     "other_load": load.fraction})
        print(f"  {path.name}: decode @ {n}: {1.0 / seconds:.1f} tok/s", file=sys.stderr)
    del llm
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {cpu_name()}, "
          f"{args.threads} threads, n_batch {args.n_batch}, n_ubatch {args.n_ubatch}, "
          f"median of {args.repetitions}\n")
    print("| model | test | tokens/s | ms/token | other load |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['test']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} "
              f"| {r['other_load']:.0%} |")
    if any(r["other_load"] > 0.05 for r in rows):
        print("\nwarning: other processes used the CPU during some tests; rerun those on an idle machine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--decode", type=int, nargs="+", default=[512, 4096],
                        help="context lengths at which decode is timed")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--n-ubatch", type=int, default=512)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each model, wait up to this long for other CPU load to stop")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()

    missing = [str(m) for m in args.models if not m.expanduser().is_file()]
    if missing:
        sys.exit("llamacpp_reference: not found: " + ", ".join(missing) +
                 " (scripts/fetch-model.sh; tests/reference/convert_gguf_f32.py for the F32 copy)")

    rows = []
    for model in args.models:
        rows += bench_model(model.expanduser(), args)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
