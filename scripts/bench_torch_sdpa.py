#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of bench_cuda_attention,
printing the same markdown columns, so both run in one GPU session:

  decode:  q (1, 32, 1, 128) against K/V (1, kv, ctx, 128) fp16, kv in {8, 32},
           ctx in {4K, 32K, 128K}; GB/s counts the K+V bytes of the kv heads.
  prefill: q (1, 32, n, 128), K/V (1, 8, n, 128), is_causal=True, flash backend.

GQA uses enable_gqa=True where torch supports it, else K/V repeated to 32
heads before timing (the timed call then reads 32 heads; GB/s still counts
the kv heads, as the paged kernel reads them).

  python3 scripts/bench_torch_sdpa.py [--mode all|decode|prefill] [--reps 50] [--peak-gbs 3350]
"""
import argparse

import torch
import torch.nn.functional as F


def time_us(fn, reps):
    fn()
    fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / reps


def supports_enable_gqa():
    q = torch.zeros(1, 2, 1, 8, device="cuda", dtype=torch.float16)
    kv = torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.float16)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


def sdpa_call(q, k, v, causal):
    """A closure running SDPA with K/V of fewer heads than q (GQA)."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and supports_enable_gqa():
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_decode(contexts, reps, peak_gbs):
    for kv_heads in (8, 32):
        for ctx in contexts:
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
            k = torch.randn(1, kv_heads, ctx, 128, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            us = time_us(sdpa_call(q, k, v, causal=False), reps)
            gbs = 2 * 2 * ctx * 128 * kv_heads / us * 1e-3
            print(f"| torch decode | ctx {ctx} q32 kv{kv_heads} d128 | {us:.1f} | {gbs:.0f} | {100 * gbs / peak_gbs:.1f}% | |")
            del q, k, v


def bench_prefill(lengths, reps):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for n in lengths:
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        flops = 4.0 * n * n / 2 * 128 * 32
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            us = time_us(sdpa_call(q, k, v, causal=True), max(2, min(reps, int(2e13 / flops))))
        print(f"| torch prefill | n {n} causal q32 kv8 d128 | {us:.0f} | | | {flops / us * 1e-6:.1f} |")
        del q, k, v
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="all", choices=["all", "decode", "prefill"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--peak-gbs", type=float, default=3350)
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"enable_gqa: {supports_enable_gqa()}\n")
    print("| mode | shape | µs/call | GB/s (K+V) | % peak BW | TFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    if args.mode in ("all", "decode"):
        bench_decode([int(x) for x in args.contexts.split(",")], args.reps, args.peak_gbs)
    if args.mode in ("all", "prefill"):
        bench_prefill([int(x) for x in args.lengths.split(",")], args.reps)


if __name__ == "__main__":
    main()
