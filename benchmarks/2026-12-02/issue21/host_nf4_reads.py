"""Host time of the fused LoRA branch over a frozen NF4 base, with and without `fused_lora._plain_reads` (reads of
the 4-bit weight past bitsandbytes' Python __torch_function__), in one process, alternating: forward + backward of
one layer at 1,537 rows (the kernel path) with tiny widths and the NF4 kernel's launch replaced by a no-op, so what
is timed is the host's Python, not arithmetic. Also the number of Params4bit __torch_function__ calls per call.

    python benchmarks/2026-12-02/issue21/host_nf4_reads.py

With `--ab`, only the host time of the call as the checkout on PYTHONPATH makes it (its own `_plain_reads`): run it
against two checkouts in turns to see whether a change added host time to the path case 4 is bound by.

    for wt in /work/main /tmp/wt-old; do PYTHONPATH=$wt python benchmarks/2026-12-02/issue21/host_nf4_reads.py --ab; done

Run on the CPU machine, 2026-12-02 (eleventh round), the head with the residual norms against 95d2c88 (run Z's
code), alternating three times, medians of ten rounds of 300 calls: 880, 744 / 607, 914, 1103 us against 552,
633 / 1180, 1096, 1008 us -- this machine's noise, in both directions; cProfile's totals over 300 calls were 0.184
and 0.190 s in the backward, 0.119 and 0.118 s in the forward's apply.
"""
import contextlib
import statistics
import sys
import time

import torch

import bitsandbytes as bnb
from peftctl import fast_path
from peftctl.train import fused_lora, nf4_kernel

fast_path.NF4_KERNEL_DEVICES = {"cuda", "cpu"}  # the kernel's path on this CPU ...
fast_path._TRITON = True


class _NoLaunch:  # ... without running the kernel: `_dequantize_nf4[grid](...)` does nothing
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


nf4_kernel._dequantize_nf4 = _NoLaunch()
dispatched = [0]
torch_function = bnb.nn.Params4bit.__torch_function__.__func__


def counting(cls, func, types, args=(), kwargs=None):
    dispatched[0] += 1
    return torch_function(cls, func, types, args, kwargs)


torch.manual_seed(0)
torch.set_num_threads(1)  # one thread: less noise from the tiny products
torch.set_flush_denormal(True)  # the skipped launch leaves the dequantised weight uninitialised: no slow denormals
base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
base.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
base = base.to("cpu").requires_grad_(False)
x = torch.randn(fused_lora.BNB_DEQUANT_MIN_ROWS, 64, requires_grad=True)
a = torch.randn(4, 64, requires_grad=True)
b = torch.randn(32, 4, requires_grad=True)
plain_reads = fused_lora._plain_reads


def one_call():
    assert fused_lora._owns_base(base, x)
    fused_lora.lora_branch(x, None, a, b, 0.0, 2.0, base=base).sum().backward()


if "--ab" in sys.argv:
    # One checkout's host time (the eleventh round's A/B of two commits): run this with each checkout first on
    # PYTHONPATH, in turns, and compare.
    for _ in range(50):
        one_call()
    rounds = []
    for _ in range(10):
        n, start = 300, time.perf_counter()
        for _ in range(n):
            one_call()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    print(f"host us a call: {statistics.median(rounds):.1f} (rounds {sorted(round(v) for v in rounds)})")
    sys.exit(0)

times = {"plain reads": [], "through __torch_function__": []}
calls = {}
for name in times:  # the count, through a counting __torch_function__ (not timed: it adds a call of its own)
    fused_lora._plain_reads = plain_reads if name == "plain reads" else contextlib.nullcontext
    bnb.nn.Params4bit.__torch_function__ = classmethod(counting)
    one_call()
    dispatched[0] = 0
    one_call()
    calls[name] = dispatched[0]
    bnb.nn.Params4bit.__torch_function__ = classmethod(torch_function)
for round_ in range(8):
    for name in list(times) if round_ % 2 == 0 else list(times)[::-1]:
        fused_lora._plain_reads = plain_reads if name == "plain reads" else contextlib.nullcontext
        n, start = 300, time.perf_counter()
        for _ in range(n):
            one_call()
        times[name].append((time.perf_counter() - start) / n * 1e6)
for name, values in times.items():
    print(f"{name}: {statistics.median(values):.1f} us a call (forward + backward; rounds {[round(v) for v in values]}),"
          f" {calls[name]} Params4bit __torch_function__ calls")
