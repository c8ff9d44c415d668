#!/usr/bin/env python3
"""Compares inferlab's tokenizer and logits with llama.cpp's, an independent
implementation, on the same GGUF model.

For each prompt: both tokenizers encode it (llama.cpp: add_bos=False,
special=True; inferlab: `inferlab tokenize`) and must agree; then the SAME
token ids (llama.cpp's) are evaluated by both, and every position's logits are
compared: top-1 agreement, max and mean absolute difference.

Usage:
  bash scripts/setup-reference.sh && bash scripts/build.sh
  .venv-ref/bin/python tests/reference/compare_llamacpp.py [--inferlab build/bin/inferlab]
      [--model PATH.gguf] [--reference-model PATH.gguf] [--min-agree 1.0]

Exit status: 0 when every prompt tokenizes identically and reaches --min-agree
top-1 agreement; 1 otherwise; 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:  # pragma: no cover - depends on the environment
    print("compare_llamacpp: llama-cpp-python is missing; run scripts/setup-reference.sh "
          "and use .venv-ref/bin/python", file=sys.stderr)
    sys.exit(2)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_gguf_f32 import default_output  # noqa: E402  (sibling script)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
DEFAULT_MODEL = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS: dict[str, str] = {
    "short-en": "The capital of France is",
    "long-en": (
        "The history of computing is a story of abstraction. Early machines were programmed "
        "by rewiring panels and flipping switches, and every program was tied to the physical "
        "layout of a particular computer. Assembly languages gave names to instructions, and "
        "compilers later let programmers describe what they wanted rather than how the "
        "hardware should do it. Operating systems hid the details of disks, memory and "
        "devices behind files and processes, so that a program written for one machine could "
        "run on many. Networks then connected those machines, and the web turned documents "
        "on distant servers into something anyone could read with a click. Each layer made "
        "the one below it easier to ignore, and each one brought its own costs: slower code, "
        "larger programs, and bugs that only appear when the layers interact in ways their "
        "designers never imagined. Today, large language models are becoming yet another "
        "layer, translating intentions written in plain language into code, queries and "
        "actions, and researchers are still learning how to make them fast, cheap and reliable."
    ),
    "code": (
        "import heapq\n"
        "from typing import Dict, List, Tuple\n\n"
        "def dijkstra(graph: Dict[str, List[Tuple[str, int]]], source: str) -> Dict[str, int]:\n"
        "    \"\"\"Shortest distances from source in a graph with non-negative weights.\"\"\"\n"
        "    dist = {source: 0}\n"
        "    heap = [(0, source)]\n"
        "    while heap:\n"
        "        d, node = heapq.heappop(heap)\n"
        "        if d > dist.get(node, float('inf')):\n"
        "            continue\n"
        "        for neighbour, weight in graph.get(node, []):\n"
        "            nd = d + weight\n"
        "            if nd < dist.get(neighbour, float('inf')):\n"
        "                dist[neighbour] = nd\n"
        "                heapq.heappush(heap, (nd, neighbour))\n"
        "    return dist\n\n"
        "if __name__ == '__main__':\n"
        "    g = {'a': [('b', 7), ('c', 9)], 'b': [('c', 10), ('d', 15)], 'c': [('d', 11)]}\n"
        "    print(dijkstra(g, 'a'))  # {'a': 0, 'b': 7, 'c': 9, 'd': 20}\n"
    ),
    "numbers": (
        "Invoice 2024-11-23 #00417: 3 x 12.50 EUR = 37.50 EUR; 17 * 23 = 391; "
        "pi = 3.14159265358979; 1,234,567,890 + 987654321 = 2222222211; "
        "call +1 (555) 010-9999 before 23:59:59."
    ),
    "chat-special": (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the boiling point of water in Kelvin?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "unicode-space": (
        "  Héllo, wörld!\n\n\tTabs\tand   runs of   spaces; naïve café, Straße, "
        "日本語のテキスト, Ελληνικά, emoji 🙂👍 — and 'quotes' don't break it's tokenizer."
    ),
}


class SetupError(Exception):
    pass


@dataclass
class PromptResult:
    name: str
    n_tokens: int
    tokens_agree: bool
    first_token_mismatch: int | None
    top1_agree: int
    max_abs: float
    mean_abs: float
    mismatches: list[tuple[int, int, int, float]]  # (position, ours, reference, reference margin)
    ours_tokens: list[int]
    ref_tokens: list[int]

    @property
    def agree_fraction(self) -> float:
        return self.top1_agree / self.n_tokens if self.n_tokens else 1.0


def run_cli(inferlab: Path, args: list[str]) -> dict:
    proc = subprocess.run([str(inferlab), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"`inferlab {args[0]}` failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SetupError(f"`inferlab {args[0]}` printed no JSON object: {proc.stdout[-500:]!r}")


def our_tokens(inferlab: Path, model: Path, text: str) -> list[int]:
    return [int(t) for t in run_cli(inferlab, ["tokenize", "--model", str(model), "--prompt", text])["tokens"]]


def our_logits(inferlab: Path, model: Path, tokens: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="inferlab-compare-") as tmp:
        out = Path(tmp) / "logits.f32"
        args = ["logits", "--model", str(model), "--tokens", ",".join(map(str, tokens)), "--out", str(out)]
        reply = run_cli(inferlab, args)
        if [int(t) for t in reply["tokens"]] != tokens:
            raise SetupError("`inferlab logits` evaluated other tokens than it was given")
        n_vocab = int(reply["n_vocab"])
        values = np.fromfile(out, dtype="<f4")
        if values.size != len(tokens) * n_vocab:
            raise SetupError(f"{out}: {values.size} floats, expected {len(tokens)} x {n_vocab}")
        return values.reshape(len(tokens), n_vocab)


def reference_logits(llm: Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def compare(name: str, ours_tok: list[int], ref_tok: list[int], ours: np.ndarray, ref: np.ndarray) -> PromptResult:
    if ours.shape != ref.shape:
        raise SetupError(f"{name}: logits shapes differ: ours {ours.shape}, llama.cpp {ref.shape}")
    first_mismatch = next((i for i, (a, b) in enumerate(zip(ours_tok, ref_tok)) if a != b),
                          None if len(ours_tok) == len(ref_tok) else min(len(ours_tok), len(ref_tok)))
    ours_top1 = ours.argmax(axis=1)
    ref_top1 = ref.argmax(axis=1)
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    mismatches = []
    for pos in np.flatnonzero(ours_top1 != ref_top1):
        top2 = np.partition(ref[pos], -2)[-2:]
        mismatches.append((int(pos), int(ours_top1[pos]), int(ref_top1[pos]), float(top2[1] - top2[0])))
    return PromptResult(name, len(ref_tok), first_mismatch is None, first_mismatch,
                        int((ours_top1 == ref_top1).sum()), float(diff.max()), float(diff.mean()),
                        mismatches, ours_tok, ref_tok)


def print_report(results: list[PromptResult], args: argparse.Namespace) -> None:
    print(f"inferlab ({args.model.name}) vs llama.cpp ({args.reference_model.name}, "
          f"{args.kv_type} KV cache), same token ids, logits at every position\n")
    print("| prompt | tokens | tokenization | top-1 agreement | max abs diff | mean abs diff |")
    print("|---|---:|---|---:|---:|---:|")
    for r in results:
        tok = "same" if r.tokens_agree else f"DIFFERS at {r.first_token_mismatch}"
        print(f"| {r.name} | {r.n_tokens} | {tok} | {100 * r.agree_fraction:.1f}% "
              f"({r.top1_agree}/{r.n_tokens}) | {r.max_abs:.2e} | {r.mean_abs:.2e} |")
    notes = []
    for r in results:
        if not r.tokens_agree:
            i = r.first_token_mismatch
            notes.append(f"{r.name}: tokenization differs from position {i}: "
                         f"ours {r.ours_tokens[i:i + 8]}, llama.cpp {r.ref_tokens[i:i + 8]}")
        for pos, ours, ref, margin in r.mismatches[:5]:
            notes.append(f"{r.name}: position {pos}: top-1 ours {ours}, llama.cpp {ref} "
                         f"(llama.cpp's top-2 margin {margin:.4f})")
    if notes:
        print("\n" + "\n".join(notes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inferlab", type=Path, default=REPO_ROOT / "build" / "bin" / "inferlab",
                        help="path to the inferlab binary (default build/bin/inferlab)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="GGUF model that inferlab loads (default: the Q4_1 SmolLM2-135M)")
    parser.add_argument("--reference-model", type=Path, default=None,
                        help="GGUF model that llama.cpp loads (default: the F32 copy of --model "
                             "that convert_gguf_f32.py writes, so that both sides compute in f32)")
    parser.add_argument("--min-agree", type=float, default=1.0,
                        help="minimum top-1 agreement per prompt, 0..1 (default 1.0)")
    parser.add_argument("--ignore-tokenization", action="store_true",
                        help="do not fail when the tokenizers disagree")
    parser.add_argument("--kv-type", choices=("f32", "f16"), default="f32",
                        help="llama.cpp's KV cache type (default f32, as inferlab's cache)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--prompts", nargs="+", choices=sorted(PROMPTS), default=list(PROMPTS))
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.model = args.model.expanduser()
    args.reference_model = (args.reference_model or default_output(args.model, "f32")).expanduser()

    try:
        for path, what in ((args.inferlab, "inferlab binary (scripts/build.sh)"),
                           (args.model, "model (scripts/fetch-model.sh)"),
                           (args.reference_model,
                            "reference model (tests/reference/convert_gguf_f32.py writes the F32 copy; "
                            "or pass --reference-model MODEL.gguf --min-agree 0.9 to compare against "
                            "llama.cpp's quantized arithmetic)")):
            if not path.is_file():
                raise SetupError(f"{path}: not found; need the {what}")
        kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[args.kv_type]
        llm = Llama(str(args.reference_model), logits_all=True, n_ctx=2048, n_batch=2048,
                    n_threads=args.threads, n_threads_batch=args.threads,
                    type_k=kv_type, type_v=kv_type, verbose=False)
        results = []
        for name in args.prompts:
            text = PROMPTS[name]
            ref_tok = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]
            ours_tok = our_tokens(args.inferlab, args.model, text)
            ref = reference_logits(llm, ref_tok)
            ours = our_logits(args.inferlab, args.model, ref_tok)
            results.append(compare(name, ours_tok, ref_tok, ours, ref))
            print(f"  {name}: {len(ref_tok)} tokens done", file=sys.stderr)
    except SetupError as e:
        print(f"compare_llamacpp: {e}", file=sys.stderr)
        return 2

    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"agree_fraction": r.agree_fraction}
                                         for r in results], indent=2) + "\n")
    failed = [r.name for r in results
              if r.agree_fraction < args.min_agree or (not r.tokens_agree and not args.ignore_tokenization)]
    if failed:
        print(f"\nFAIL: {', '.join(failed)} (min top-1 agreement {args.min_agree:.0%}"
              f"{'' if args.ignore_tokenization else ', identical tokenization'})")
        return 1
    print(f"\nPASS: {len(results)} prompts, top-1 agreement >= {args.min_agree:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
