"""Time one decoder layer's LoRA layers on the GPU: peft's forward, peftctl's fused branch, LoRA's dropout kernel.

Each of the Llama-3-8B layer's seven linear shapes is wrapped by peft's own LoRA layer (bf16 or 4-bit NF4 base,
float32 adapter, r 16, alpha 32, dropout 0.05) and run forward and backward under bf16 autocast on `--tokens`
tokens, through peft's forward, through `peftctl.train.fused_lora` with torch's dropout (today's fused branch), and
through the same branch with the dropout kernel (`peftctl/train/lora_dropout_kernel.py`). Prints the median time
of each and their sum over the layer; checks that peft and the fused branch give the same output and gradients
with dropout off, and that the kernel's output and A's gradient follow the explicit formula for the mask read back
from x's gradient (with the dropped fraction, about `--dropout`); then what the seven layers keep for the backward
pass with siblings sharing their input (q/k/v, gate/up), each way, and the memory the kernel saves.

    python scripts/bench_lora_branch.py --quant 4bit --tokens 8192

A CPU smoke run of the harness (what tests/test_bench.py runs; the kernel column runs only under
TRITON_INTERPRET=1): `--device cpu --quant none --shrink 64 --tokens 16`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
          "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def _layer(width_in, width_out, quant, dropout, device):
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora_layer

    if quant == "4bit":
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as lora_bnb

        base = bnb.nn.Linear4bit(width_in, width_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(torch.randn(width_out, width_in) * 0.02, requires_grad=False,
                                        quant_type="nf4")
        base = base.cuda()
        cls = lora_bnb.Linear4bit
    else:
        base = torch.nn.Linear(width_in, width_out, bias=False, dtype=torch.bfloat16, device=device)
        base.weight.requires_grad_(False)
        cls = lora_layer.Linear
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, init_lora_weights=False)
    layer = cls(base, "default", config=config, r=16, lora_alpha=32)
    return layer.to(device).train()


def _time(fn, repeats, device):
    """Median milliseconds of `fn` after 3 warm-up calls; CUDA events on the GPU."""
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1000
        if i >= 3:
            times.append(elapsed)
    return statistics.median(times)


ROLES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}  # siblings read the same input


def _rel(a, b) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-9)


def _kept_bytes(forwards, params) -> int:
    """Bytes autograd keeps for the backward pass after these forwards: each storage once, parameters excluded."""
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [f() for f in forwards]
    del outs
    return sum(kept.values())


def _kernel_check(layer, x, grad, device):
    """With dropout on, the layer's branch through the kernel (the base output given, so that x's gradient is the
    branch's alone): the mask read back from x's gradient (zero exactly where dropped), the output and A's gradient
    against the explicit formula with that mask, and the dropped fraction."""
    from peftctl.train.fused_lora import lora_branch

    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    p, scaling = layer.lora_dropout["default"].p, layer.scaling["default"]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        base = layer.base_layer(x)
    x.grad = None
    layer.zero_grad()
    out = lora_branch(x, base, lora_a, lora_b, p, scaling)
    out.backward(grad)
    kept = x.grad != 0
    dropped = x.detach().float() * kept / (1 - p)
    want = base.float() + (dropped @ lora_a.float().t()) @ lora_b.float().t() * scaling
    grad_h = (grad.float() @ lora_b.float()) * scaling
    return (1 - kept.float().mean().item(), _rel(out.float(), want),
            _rel(lora_a.grad.float(), grad_h.t() @ dropped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", choices=["none", "4bit"], default="4bit")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shrink", type=int, default=1, help="divide every layer width by this (smoke runs)")
    args = parser.parse_args()
    if args.quant == "4bit" and args.device != "cuda":
        parser.error("--quant 4bit needs --device cuda")

    from peftctl import fast_path
    from peftctl.train import fused_lora
    from peftctl.train.fused_lora import _fused_forward

    calls = []  # proof that the routed forward took the fused branch rather than falling back to peft's
    branch = fused_lora.lora_branch
    fused_lora.lora_branch = lambda *a, **k: (calls.append(1), branch(*a, **k))[1]
    kernel_calls = []  # and that the kernel column ran the dropout kernel
    kernel_forward = fused_lora._KernelDropout.forward
    fused_lora._KernelDropout.forward = staticmethod(lambda *a: (kernel_calls.append(1), kernel_forward(*a))[1])
    device = args.device
    # the kernel on the CPU only in Triton's interpreter (the smoke run of tests/test_bench.py)
    kernel_devices = {"cuda"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    has_kernel = device in kernel_devices and args.dropout > 0 and fast_path.triton_available()

    def kernel_on(on: bool) -> None:
        fast_path.LORA_DROPOUT_KERNEL_DEVICES = kernel_devices if on else set()

    torch.manual_seed(0)
    totals = {"peft": 0.0, "fused": 0.0, "kernel": 0.0}
    print(f"{'layer':<10} {'peft ms':>8} {'fused ms':>9} {'kernel ms':>9} {'ratio':>6} {'kernel':>6} "
          f"{'rel. diff out / grad x / grad A':>32} {'fused calls':>11} {'kernel: dropped / out / grad A':>31}")
    inputs, layers = {}, {}
    for name, (width_in, width_out) in SHAPES.items():
        width_in, width_out = width_in // args.shrink, width_out // args.shrink
        layer = _layer(width_in, width_out, args.quant, args.dropout, device)
        layers[name] = layer
        if ROLES[name] not in inputs:
            inputs[ROLES[name]] = torch.randn(args.tokens, width_in, device=device, dtype=torch.bfloat16,
                                              requires_grad=True)
        x = inputs[ROLES[name]]
        grad = torch.randn(args.tokens, width_out, device=device, dtype=torch.bfloat16)
        fused = types.MethodType(_fused_forward, layer)

        def step(forward, x=x, grad=grad):  # bound now: B023
            with torch.autocast(device, dtype=torch.bfloat16):
                out = forward(x)
            out.backward(grad)

        layer.lora_dropout["default"].eval()  # dropout off: both paths must agree
        outputs = []
        for forward in (layer.forward, fused):
            x.grad = None
            layer.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                out = forward(x)
            out.backward(grad)
            outputs.append((out.float(), x.grad.float(), layer.lora_A["default"].weight.grad.clone()))
        diffs = " / ".join(f"{_rel(a, b):.1e}" for a, b in zip(*outputs))
        layer.lora_dropout["default"].train()
        kernel_on(False)
        peft_ms = _time(lambda layer=layer: step(layer.forward), args.repeats, device)
        calls.clear()
        fused_ms = _time(lambda fused=fused: step(fused), args.repeats, device)
        fused_calls = len(calls)
        kernel_ms, check = float("nan"), "n/a"
        if has_kernel:
            kernel_on(True)
            kernel_calls.clear()
            kernel_ms = _time(lambda fused=fused: step(fused), args.repeats, device)
            if len(kernel_calls) != args.repeats + 3:  # the timed calls must have run the kernel
                raise SystemExit(f"{name}: the kernel ran {len(kernel_calls)} times, not {args.repeats + 3}")
            check = "{:.3f} / {:.1e} / {:.1e}".format(*_kernel_check(layer, x, grad, device))
            kernel_on(False)
        for key, ms in (("peft", peft_ms), ("fused", fused_ms), ("kernel", kernel_ms)):
            totals[key] += ms
        print(f"{name:<10} {peft_ms:8.3f} {fused_ms:9.3f} {kernel_ms:9.3f} {peft_ms / fused_ms:6.2f} "
              f"{peft_ms / kernel_ms:6.2f} {diffs:>32} {fused_calls:>11} {check:>31}")
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"{'layer sum':<10} {totals['peft']:8.3f} {totals['fused']:9.3f} {totals['kernel']:9.3f} "
          f"{totals['peft'] / totals['fused']:6.2f} {totals['peft'] / totals['kernel']:6.2f}"
          f"   ({args.quant}, {args.tokens} tokens, dropout {args.dropout}; forward + backward, median of "
          f"{args.repeats}; {device})")
    _print_memory(layers, inputs, device, has_kernel, kernel_on)


def _print_memory(layers, inputs, device, has_kernel, kernel_on) -> None:
    """What the seven layers of one decoder layer keep for the backward pass (siblings given the same input, as in
    the model), through peft's forward, the fused branch and the kernel."""
    from peftctl.train.fused_lora import _fused_forward

    params = {p.untyped_storage().data_ptr() for layer in layers.values() for p in layer.parameters()}
    params |= {x.untyped_storage().data_ptr() for x in inputs.values()}  # the inputs exist anyway...
    # ...but a branch that keeps one is counted: x's storage is then "kept", once however many siblings keep it
    forwards = {}
    for name, layer in layers.items():
        x = inputs[ROLES[name]]
        fused = types.MethodType(_fused_forward, layer)
        forwards.setdefault("peft", []).append(lambda layer=layer, x=x: layer(x))
        forwards.setdefault("fused", []).append(lambda fused=fused, x=x: fused(x))
    kept = {}
    for key in ("peft", "fused", "kernel"):
        if key == "kernel" and not has_kernel:
            continue
        kernel_on(key == "kernel")
        with torch.autocast(device, dtype=torch.bfloat16):
            kept[key] = _kept_bytes(forwards["fused" if key == "kernel" else key], params)
            kept[key] += sum(x.numel() * x.element_size() for x in inputs.values()) if key == "kernel" else 0
    kernel_on(False)
    line = ", ".join(f"{k} {v / 2 ** 20:,.2f} MiB" for k, v in kept.items())
    saved = f"; the kernel keeps {(kept['fused'] - kept['kernel']) / 2 ** 20:,.2f} MiB less" if "kernel" in kept else ""
    print(f"kept for backward by one decoder layer's 7 LoRA layers (activations only): {line}{saved}")


if __name__ == "__main__":
    main()
