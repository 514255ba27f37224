#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the shapes of bench/cuda/attention.cu, for comparison.

S = 16384, H = 16, D = 128, bf16, causal and full: forward, and backward alone (forward+backward
time minus forward time), for every SDPA backend that runs (flash, cuDNN, efficient), timed with
CUDA events (median of repeats after warm-up). FLOPs as in the fpdt benchmark: forward
4 S^2 H D (halved when causal), backward 2.5x the forward. Prints one line per measurement:
  sdpa <backend> causal=<0|1> <fwd|bwd> <ms> ms <TFLOP/s> TFLOP/s
"""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    s, h, d = 16384, 16, 128
    if not torch.cuda.is_available():
        print("sdpa: no CUDA device")
        return 0
    torch.manual_seed(0)
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for causal in (0, 1):
        fwd_flops = 4.0 * s * s * h * d / (2 if causal else 1)
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    def fwd():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))

                    def fwdbwd():
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
                        o.backward(g)

                    t_f = median_ms(fwd)
                    t_fb = median_ms(fwdbwd)
            except Exception as e:  # a backend that does not support the shape or the device
                print(f"sdpa {name} causal={causal} unavailable: {str(e).splitlines()[0][:100]}")
                continue
            t_b = t_fb - t_f
            print(f"sdpa {name} causal={causal} fwd {t_f:.3f} ms {fwd_flops / t_f * 1e-9:.1f} TFLOP/s")
            print(f"sdpa {name} causal={causal} bwd {t_b:.3f} ms {2.5 * fwd_flops / t_b * 1e-9:.1f} TFLOP/s")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
