"""NF4 dequantisation on the GPU: bitsandbytes' dequantize_4bit (three launches through torch.library) against
peftctl's one-launch Triton kernel (peftctl/train/nf4_kernel.py) at several tilings; GPU time per call (CUDA events,
median of 5 x 50 calls) and host time per call (launching 50 calls behind a busy GPU). Also the LoRA backward's
small GEMMs: mm then mul_ against addmm with alpha (beta 0).

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/microbench_nf4_dequant.py
"""
import statistics
import time

import bitsandbytes.functional as F
import gpu_timing  # this folder's shared timer
import torch

from peftctl.train import nf4_kernel


gpu_ms = gpu_timing.gpu_ms


def host_us(fn, calls=50):
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        for _ in range(3):
            big @ big  # keep the GPU busy so launches never wait
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


for shape in ((14336, 4096), (4096, 4096), (1024, 4096)):
    torch.manual_seed(0)
    w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    param = torch.nn.Parameter(packed, requires_grad=False)
    param.quant_state = state
    ref = F.dequantize_4bit(packed, state)
    print(f"{shape}: bitsandbytes {gpu_ms(lambda: F.dequantize_4bit(packed, state)) * 1000:.1f} us GPU, "
          f"{host_us(lambda: F.dequantize_4bit(packed, state)):.1f} us host")
    for blocks in (8, 16, 32, 64):
        for warps in (2, 4, 8):
            # (run as recorded with a `blocks=` argument; blocks of 64 values: values = 64 x blocks)
            fn = lambda: nf4_kernel.dequantize_nf4(param, torch.bfloat16, values=64 * blocks, warps=warps)  # noqa: E731
            same = torch.equal(fn(), ref)
            print(f"  ours blocks {blocks:3d} warps {warps}: {gpu_ms(fn) * 1000:.1f} us GPU, {host_us(fn):.1f} us host,"
                  f" same {same}")

tokens, r = 8192, 16
for out in (1024, 4096, 14336):
    g = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(out, r, device="cuda", dtype=torch.bfloat16)
    none = g.new_empty(())
    rows = {
        "grad_b mm+mul": lambda: (g.t() @ h).mul_(2.0),
        "grad_b addmm": lambda: torch.addmm(none, g.t(), h, beta=0, alpha=2.0),
        "grad_h mm+mul": lambda: (g @ b).mul_(2.0),
        "grad_h addmm": lambda: torch.addmm(none, g, b, beta=0, alpha=2.0),
    }
    print(f"out {out}: " + ", ".join(f"{k} {gpu_ms(fn) * 1000:.1f} us" for k, fn in rows.items()))
