#!/usr/bin/env python3
"""Side by side: fpdt's host chunk attention kernel vs PyTorch's CPU scaled_dot_product_attention.

Runs `fpdt-bench` (Google Benchmark, JSON output) for the chunk_forward / chunk_backward benchmarks
and times torch.nn.functional.scaled_dot_product_attention forward and backward on the same shapes
(H = 8, S = Sq = Sk, D, fp32 / bf16, full / causal) in the same run, with the same thread count,
then prints throughput in GFLOP/s and the ratio ours / torch. FLOPs as in docs/design.md 5: forward
4 S^2 H D, backward 2.5x, both halved for causal.

torch is optional (pip install torch); without it only fpdt's numbers are printed.

  python3 scripts/bench_attention_vs_torch.py [--bench build/default/bench/fpdt-bench]
      [--seq 1024 2048 4096 8192] [--dim 64 128] [--dtype f32 bf16] [--mask full causal]
      [--min-time 0.5] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

H = 8


def flops(s, d, causal, backward):
    f = 4.0 * s * s * H * d
    if causal:
        f /= 2
    return 2.5 * f if backward else f


def run_fpdt(bench, shapes, min_time):
    names = {"f32": "float", "bf16": "fpdt::bfloat16"}
    results = {}
    pats = []
    for (s, d, dt, causal) in shapes:
        for kind in ("forward", "backward"):
            pats.append(f"chunk_{kind}<{names[dt]}>/S:{s}/D:{d}/causal:{int(causal)}/")
    filt = "|".join(p.replace("<", ".").replace(">", ".").replace(":", ".") for p in pats)
    out = subprocess.run([bench, f"--benchmark_filter={filt}", "--benchmark_format=json",
                          f"--benchmark_min_time={min_time}"], check=True, capture_output=True, text=True)
    data = json.loads(out.stdout)
    for b in data["benchmarks"]:
        name = b["name"]
        kind = "forward" if name.startswith("chunk_forward") else "backward"
        dt = "bf16" if "bfloat16" in name else "f32"
        parts = dict(p.split(":") for p in name.split("/")[1:] if ":" in p)
        key = (int(parts["S"]), int(parts["D"]), dt, bool(int(parts["causal"])), kind)
        results[key] = b["FLOP/s"] / 1e9
    return results


def run_torch(shapes, repeats):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch not installed (pip install torch): printing fpdt only", file=sys.stderr)
        return None, None
    torch.set_num_threads(os.cpu_count() or 1)
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    res = {}
    for (s, d, dt, causal) in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, s, d, generator=g, dtype=dtypes[dt]).requires_grad_() for _ in range(3))
        dout = torch.randn(1, H, s, d, generator=g, dtype=dtypes[dt])
        fwd, bwd = [], []
        for _ in range(repeats + 1):  # first round warms up
            t0 = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t1 = time.perf_counter()
            out.backward(dout)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            q.grad = k.grad = v.grad = None
        res[(s, d, dt, causal, "forward")] = flops(s, d, causal, False) / statistics.median(fwd[1:]) / 1e9
        res[(s, d, dt, causal, "backward")] = flops(s, d, causal, True) / statistics.median(bwd[1:]) / 1e9
    return res, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/default/bench/fpdt-bench")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    ap.add_argument("--mask", nargs="+", default=["full", "causal"], choices=["full", "causal"])
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if not os.access(a.bench, os.X_OK):
        sys.exit(f"{a.bench} not found: build it first (cmake --build --preset default --target fpdt-bench)")
    shapes = [(s, d, dt, m == "causal") for m in a.mask for dt in a.dtype for d in a.dim for s in a.seq]
    ours = run_fpdt(a.bench, shapes, a.min_time)
    theirs, who = run_torch(shapes, a.repeats)
    print(f"H={H}; GFLOP/s; {who or 'no torch'}; fpdt threads = all hardware threads")
    print(f"{'S':>6} {'D':>4} {'dtype':>5} {'mask':>6} | {'fwd fpdt':>9} {'torch':>8} {'ratio':>6} | {'bwd fpdt':>9} {'torch':>8} {'ratio':>6}")
    ratios = []
    for (s, d, dt, causal) in shapes:
        row = f"{s:>6} {d:>4} {dt:>5} {'causal' if causal else 'full':>6} |"
        for kind in ("forward", "backward"):
            o = ours.get((s, d, dt, causal, kind), float("nan"))
            t = theirs.get((s, d, dt, causal, kind), float("nan")) if theirs else float("nan")
            r = o / t if theirs else float("nan")
            if theirs:
                ratios.append(r)
            row += f" {o:9.1f} {t:8.1f} {r:6.2f} |"
        print(row.rstrip("|"))
    if ratios:
        print(f"geometric mean ratio fpdt / torch: {statistics.geometric_mean(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
