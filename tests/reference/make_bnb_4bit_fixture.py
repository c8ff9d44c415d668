#!/usr/bin/env python3
"""Writes bnb_4bit.json: bitsandbytes' NF4 / FP4 blockwise 4-bit quantization of fixed inputs.

A golden fixture for inferlab's QLoRA-style 4-bit weight format: for each
input, quantization type (nf4, fp4), block size and double quantization on or
off, the packed 4-bit codes, the block scales (plain float32 absmax, or the
double-quantized form: 8-bit absmax codes, the per-256-block float32 scales of
those, the offset and the 8-bit dynamic code map) and the first values of
bitsandbytes' own dequantize_4bit. Everything comes from bitsandbytes' CPU path
(torch CPU tensors); nothing here needs a GPU.

Beyond the fixture, the script re-derives every case with plain numpy (nearest
4-bit level after scaling by 1/absmax, the 65536-bin table bitsandbytes' CPU
library uses for the 8-bit absmax codes, the dequantization formulas) and says
whether the bytes agree, so the rules the C++ side implements are checked here.

Usage:
  .venv-lora/bin/python tests/reference/make_bnb_4bit_fixture.py [--out FILE] [--model GGUF]

Needs the venv of scripts/setup-reference-lora.sh (torch, bitsandbytes, gguf,
numpy). Developer-time only: ctest reads the committed JSON and needs no Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

try:
    import torch
    import gguf
    from gguf.quants import dequantize as gguf_dequantize
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"make_bnb_4bit_fixture: {exc.name} missing; run scripts/setup-reference-lora.sh "
             "and use .venv-lora/bin/python")

# bitsandbytes logs about optional CPU GEMM kernels it cannot fetch; irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="bitsandbytes")
try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except ImportError:  # pragma: no cover
    sys.exit("make_bnb_4bit_fixture: bitsandbytes missing; run scripts/setup-reference-lora.sh")

HERE = Path(__file__).resolve().parent
MODEL_DIR = Path(os.environ.get("INFERLAB_MODEL_DIR",
                                Path.home() / ".cache" / "inferlab" / "models"))
DEFAULT_MODEL = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = HERE / "bnb_4bit.json"
HEAD = 1024  # values of dequantize_4bit stored per case


def hexf32(a) -> str:
    return np.ascontiguousarray(np.asarray(a, dtype="<f4")).tobytes().hex()


def hexu8(a) -> str:
    return np.ascontiguousarray(np.asarray(a, dtype=np.uint8)).tobytes().hex()


def make_inputs(model: Path) -> dict[str, np.ndarray]:
    inputs = {
        # Not a multiple of 64: the last block is partial (1000 = 15*64 + 40).
        "random_1000": np.random.default_rng(1).normal(0.0, 0.02, 1000).astype(np.float32),
        # 20000 = 312*64 + 32: 313 blocks of 64, so double quantization has two
        # groups of 256 absmax values, the second one partial (57).
        "random_20000": np.random.default_rng(2).normal(0.0, 0.02, 20000).astype(np.float32),
    }
    if not model.is_file():
        sys.exit(f"make_bnb_4bit_fixture: {model} not found (run scripts/fetch-model.sh)")
    reader = gguf.GGUFReader(model)
    tensor = next((t for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)
    if tensor is None:
        sys.exit("make_bnb_4bit_fixture: blk.0.attn_q.weight missing from the model")
    rows = int(tensor.shape[1])
    cols = int(tensor.shape[0])  # ggml ne0: the input dimension, contiguous
    values = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols).astype(np.float32)
    # GGUF row order (q rows permuted for rope as the GGUF converter stores them), rows 0..63.
    inputs["attn_q_blk0_rows0_63"] = np.ascontiguousarray(values[:64]).reshape(-1)
    return inputs


def case_list() -> list[tuple[str, str, int, bool]]:
    cases = []
    for name in ("random_1000", "random_20000", "attn_q_blk0_rows0_63"):
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                cases.append((name, quant_type, 64, double_quant))
    for blocksize in (128, 256):
        cases.append(("random_20000", "nf4", blocksize, False))
    return cases


# ---------------------------------------------------------------------------
# Independent numpy re-derivation of what bitsandbytes computes (checks only).

def np_block_absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    n = x.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:n] = np.abs(x)
    return padded.reshape(blocks, blocksize).max(axis=1)


def np_quantize_4bit(x: np.ndarray, blocksize: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest level of the 16-entry code after scaling each block into [-1, 1].

    Full blocks are scaled by x * (1/absmax) (a float32 reciprocal, then a
    multiply), the last partial block by x / absmax; a value exactly on the
    midpoint between two sorted levels takes the lower one. The 16 codes are
    sorted with FP4's +0 (code 0) before -0 (code 8), so values in (-h, 0]
    get code 0 and (0, h] code 8 (h = half the smallest FP4 step).
    """
    n = x.size
    absmax = np_block_absmax(x, blocksize)
    safe = np.maximum(absmax, np.float32(1e-38))
    full = n - n % blocksize
    scaled = np.empty(n, np.float32)
    inv = (np.float32(1.0) / safe[: full // blocksize]).astype(np.float32)
    scaled[:full] = (x[:full].reshape(-1, blocksize) * inv[:, None]).reshape(-1)
    if full < n:
        scaled[full:] = x[full:] / safe[-1]
    scaled = np.clip(scaled, -1.0, 1.0)
    order = np.array(sorted(range(16), key=lambda i: (float(code[i]), i)), dtype=np.int64)
    sorted_code = code[order]
    bounds = ((sorted_code[:-1] + sorted_code[1:]) / np.float32(2)).astype(np.float32)
    idx = order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8)
    if n % 2:
        idx = np.append(idx, order[np.searchsorted(bounds, np.float32(0), side="left")])
    packed = (idx[0::2] << 4) | idx[1::2]  # first value of each pair in the high nibble
    return packed.astype(np.uint8), absmax


def np_quantize_blockwise_8bit(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU library (cquantize_blockwise_cpu_fp32): a 65536-bin lookup table.

    lut[i] = index of the first sorted code entry whose upper midpoint is not
    below -1 + 2i/65535; a value v (scaled by 1/absmax, clamped to [-1, 1])
    takes lut[uint16((v + 1) * 0.5 * 65535 + 0.5)].
    """
    size = 65536
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(size, dtype=np.float32)) /
            np.float32(size - 1)).astype(np.float32)
    lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)
    absmax = np_block_absmax(x, blocksize)
    out = np.zeros(x.size, np.uint8)
    for b in range(absmax.size):
        seg = x[b * blocksize:(b + 1) * blocksize]
        if absmax[b] == 0:
            continue
        inv = np.float32(1.0) / absmax[b]
        v = np.clip((seg * inv).astype(np.float32), -1.0, 1.0)
        index = ((v + np.float32(1.0)) * np.float32(0.5) * np.float32(size - 1) + np.float32(0.5))
        out[b * blocksize:(b + 1) * blocksize] = lut[index.astype(np.float32).astype(np.uint16)]
    return out, absmax


def np_dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, n: int,
                       blocksize: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2] = packed >> 4
    nibbles[1::2] = packed & 0xF
    scale = np.repeat(absmax.astype(np.float32), blocksize)[:n]
    return (code[nibbles[:n]] * scale).astype(np.float32)


# ---------------------------------------------------------------------------

def run_case(x: np.ndarray, quant_type: str, blocksize: int, double_quant: bool,
             code4: np.ndarray, findings: dict) -> dict:
    tensor = torch.from_numpy(x.copy())
    packed, state = bnbf.quantize_4bit(tensor, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type)
    codes = packed.numpy().reshape(-1).astype(np.uint8)
    if codes.size != (x.size + 1) // 2:
        sys.exit(f"make_bnb_4bit_fixture: {codes.size} code bytes for {x.size} values")
    deq = bnbf.dequantize_4bit(packed, state).numpy().reshape(-1).astype(np.float32)
    blocks = -(-x.size // blocksize)

    out = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
           "codes": hexu8(codes)}
    ref_codes, ref_absmax = np_quantize_4bit(x, blocksize, code4)
    findings["codes_nearest"].append(bool(np.array_equal(ref_codes, codes)))
    if double_quant:
        absmax_codes = state.absmax.numpy().astype(np.uint8)
        nested_absmax = state.state2.absmax.numpy().astype(np.float32)
        offset = np.float32(state.offset.item())
        nested_code = state.state2.code.numpy().astype(np.float32)
        if absmax_codes.size != blocks or nested_absmax.size != -(-blocks // 256):
            sys.exit("make_bnb_4bit_fixture: unexpected double-quantization state sizes")
        if state.state2.blocksize != 256 or nested_code.size != 256:
            sys.exit("make_bnb_4bit_fixture: unexpected nested block size or code map")
        out["absmax_codes"] = hexu8(absmax_codes)
        out["nested_absmax"] = hexf32(nested_absmax)
        out["offset"] = hexf32([offset])
        out["nested_code"] = hexf32(nested_code)
        # Offset = float32 mean of the block absmax values; codes of (absmax - offset).
        findings["offset_is_mean"].append(
            abs(float(offset) - float(ref_absmax.astype(np.float64).mean())) <= 1e-6 * float(offset))
        centred = (ref_absmax - offset).astype(np.float32)
        lut_codes, lut_absmax = np_quantize_blockwise_8bit(centred, nested_code, 256)
        findings["absmax_codes_lut"].append(bool(np.array_equal(lut_codes, absmax_codes)))
        findings["nested_absmax_exact"].append(bool(np.array_equal(lut_absmax, nested_absmax)))
        blocks256 = np.repeat(nested_absmax, 256)[:blocks]
        absmax_used = ((nested_code[absmax_codes] * blocks256).astype(np.float32) + offset).astype(np.float32)
    else:
        absmax = state.absmax.numpy().astype(np.float32)
        if absmax.size != blocks:
            sys.exit("make_bnb_4bit_fixture: unexpected absmax size")
        out["absmax"] = hexf32(absmax)
        findings["absmax_exact"].append(bool(np.array_equal(absmax, ref_absmax)))
        absmax_used = absmax
    mine = np_dequantize_4bit(codes, absmax_used, code4, x.size, blocksize)
    findings["dequant_exact"].append(bool(np.array_equal(mine, deq)))
    out["dequantized_head"] = hexf32(deq[:min(x.size, HEAD)])

    # Sanity: the dequantized values are the input up to 4-bit error.
    err = np.abs(deq - x)
    scale = np.repeat(absmax_used, blocksize)[:x.size]
    worst = float((err / np.maximum(scale, 1e-30)).max())
    limit = 0.5 * (0.6667 - 0.3333) if quant_type == "fp4" else 0.17  # half the widest level gap
    if worst > limit + 0.02:
        sys.exit(f"make_bnb_4bit_fixture: {quant_type} bs={blocksize} dq={double_quant}: "
                 f"dequantization error {worst:.3f} x absmax is too large")
    out["_summary"] = (f"max |dq-x| {err.max():.2e}, rms {np.sqrt((err ** 2).mean()):.2e}, "
                       f"worst {worst:.3f} x absmax")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()

    torch.manual_seed(0)
    inputs = make_inputs(args.model.expanduser())
    findings = {k: [] for k in ("codes_nearest", "absmax_exact", "dequant_exact", "offset_is_mean",
                                "absmax_codes_lut", "nested_absmax_exact")}
    cases = []
    for name, quant_type, blocksize, double_quant in case_list():
        code4 = bnbf.get_4bit_type(quant_type, device="cpu").numpy().astype(np.float32)
        case = run_case(inputs[name], quant_type, blocksize, double_quant, code4, findings)
        summary = case.pop("_summary")
        print(f"  {name:22s} {quant_type} bs={blocksize:<3d} double_quant={str(double_quant):5s} {summary}")
        cases.append({"input": name, **case})

    # Nibble order, shown on the first case: value 0 in the high nibble of byte 0.
    first = bytes.fromhex(cases[0]["codes"])[0]
    code_nf4 = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    x0 = inputs[cases[0]["input"]][:2]
    absmax0 = np.frombuffer(bytes.fromhex(cases[0]["absmax"]), "<f4")[0]
    high_first = (abs(code_nf4[first >> 4] * absmax0 - x0[0]) <= abs(code_nf4[first & 15] * absmax0 - x0[0]))

    doc = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__.split("+")[0],
        "inputs": {name: {"n": int(v.size), "data": hexf32(v)} for name, v in inputs.items()},
        "cases": cases,
    }
    tmp = args.out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, args.out)

    def verdict(key: str) -> str:
        got = findings[key]
        return f"{sum(got)}/{len(got)}" if got else "-"

    print(f"make_bnb_4bit_fixture: bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}")
    print(f"  nibble order: first value of a pair in the {'high' if high_first else 'low'} nibble")
    print(f"  codes equal to numpy nearest-level rule:             {verdict('codes_nearest')}")
    print(f"  absmax equal to max|x| per block:                    {verdict('absmax_exact')}")
    print(f"  offset = mean of the block absmax values:            {verdict('offset_is_mean')}")
    print(f"  absmax codes equal to the 65536-bin LUT rule:        {verdict('absmax_codes_lut')}")
    print(f"  nested absmax = max|absmax - offset| per 256 blocks: {verdict('nested_absmax_exact')}")
    print(f"  dequantize_4bit equal to code[nibble] * absmax:      {verdict('dequant_exact')}")
    print(f"make_bnb_4bit_fixture: wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB, "
          f"{len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
