#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of bench_cuda_attention,
printing the same markdown columns, so both run in one GPU session:

  decode:  q (1, 32, 1, 128) against K/V (1, kv, ctx, 128) fp16, kv in {8, 32},
           ctx in {4K, 32K, 128K}; GB/s counts the K+V bytes of the kv heads.
  prefill: q (1, 32, n, 128), K/V (1, 8, n, 128), is_causal=True, on each of
           the flash (FlashAttention-2) and cuDNN backends this torch offers.
Rows whose K+V fit the GPU's L2 cache say so (repeated calls then measure L2
and launch latency, not DRAM), as bench_cuda_attention's do.

GQA uses enable_gqa=True where torch supports it, else K/V repeated to 32
heads before timing (the timed call then reads 32 heads; GB/s still counts
the kv heads, as the paged kernel reads them).

  python3 scripts/bench_torch_sdpa.py [--mode all|decode|prefill] [--reps 50] [--peak-gbs 3350]
"""
import argparse
import sys

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


def l2_note(nbytes):
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    return " (fits L2)" if nbytes < l2 else ""


def bench_decode(contexts, reps, peak_gbs):
    for kv_heads in (8, 32):
        for ctx in contexts:
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
            k = torch.randn(1, kv_heads, ctx, 128, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            us = time_us(sdpa_call(q, k, v, causal=False), reps)
            nbytes = 2 * 2 * ctx * 128 * kv_heads
            gbs = nbytes / us * 1e-3
            share = f"{100 * gbs / peak_gbs:.1f}%" if peak_gbs > 0 else ""  # 0: not known for this GPU
            print(f"| torch decode | ctx {ctx} q32 kv{kv_heads} d128{l2_note(nbytes)} | {us:.1f} | {gbs:.0f} "
                  f"| {share} | |")
            del q, k, v


def prefill_backends():
    """(name, context manager factory) for each backend to time: flash and, where
    this torch has it, cuDNN (often the faster on Hopper)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:
        return [("flash", lambda: torch.backends.cuda.sdp_kernel(
            enable_flash=True, enable_math=False, enable_mem_efficient=False))]
    backends = [("flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(("cudnn", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])))
    return backends


def bench_prefill(lengths, reps):
    for n in lengths:
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        flops = 4.0 * n * n / 2 * 128 * 32
        for name, backend in prefill_backends():
            try:
                with backend():
                    us = time_us(sdpa_call(q, k, v, causal=True), max(2, min(reps, int(2e13 / flops))))
            except RuntimeError as e:  # a backend that does not take this shape or GPU
                print(f"| torch prefill ({name}) | n {n} causal q32 kv8 d128 | not run: {str(e).splitlines()[0][:80]} | | | |")
                continue
            print(f"| torch prefill ({name}) | n {n} causal q32 kv8 d128 | {us:.0f} | | | {flops / us * 1e-6:.1f} |")
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
    if not torch.cuda.is_available():
        sys.exit("bench_torch_sdpa: CUDA is not available")
    sys.stdout.reconfigure(line_buffering=True)  # rows reach a log as measured (a capped run keeps them)
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
