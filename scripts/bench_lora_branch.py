"""Time one decoder layer's LoRA layers, peft's forward against peftctl's fused branch, on the GPU.

Each of the Llama-3-8B layer's seven linear shapes is wrapped by peft's own LoRA layer (bf16 or 4-bit NF4 base,
float32 adapter, r 16, alpha 32, dropout 0.05) and run forward and backward under bf16 autocast on `--tokens`
tokens, once through peft's forward and once through `peftctl.train.fused_lora`. Prints the median time of each
and their sum over the layer, and checks that both give the same output and gradients with dropout off.

    python scripts/bench_lora_branch.py --quant 4bit --tokens 8192

A CPU smoke run of the harness (what tests/test_bench.py runs): `--device cpu --quant none --shrink 64 --tokens 32`.
"""

from __future__ import annotations

import argparse
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

    from peftctl.train import fused_lora
    from peftctl.train.fused_lora import _fused_forward

    calls = []  # proof that the routed forward took the fused branch rather than falling back to peft's
    branch = fused_lora.lora_branch
    fused_lora.lora_branch = lambda *a, **k: (calls.append(1), branch(*a, **k))[1]

    torch.manual_seed(0)
    totals = {"peft": 0.0, "fused": 0.0}
    print(f"{'layer':<10} {'peft ms':>8} {'fused ms':>9} {'ratio':>6} {'rel. diff out / grad x / grad A':>32}"
          f" {'fused calls':>11}")
    device = args.device
    for name, (width_in, width_out) in SHAPES.items():
        width_in, width_out = width_in // args.shrink, width_out // args.shrink
        layer = _layer(width_in, width_out, args.quant, args.dropout, device)
        x = torch.randn(args.tokens, width_in, device=device, dtype=torch.bfloat16, requires_grad=True)
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
        diffs = " / ".join(f"{(a - b).abs().max().item() / max(a.abs().max().item(), 1e-9):.1e}"
                           for a, b in zip(*outputs))
        layer.lora_dropout["default"].train()
        peft_ms = _time(lambda layer=layer: step(layer.forward), args.repeats, device)
        calls.clear()
        fused_ms = _time(lambda fused=fused: step(fused), args.repeats, device)
        totals["peft"] += peft_ms
        totals["fused"] += fused_ms
        print(f"{name:<10} {peft_ms:8.3f} {fused_ms:9.3f} {peft_ms / fused_ms:6.2f} {diffs:>32} {len(calls):>11}")
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"{'layer sum':<10} {totals['peft']:8.3f} {totals['fused']:9.3f} {totals['peft'] / totals['fused']:6.2f}"
          f"   ({args.quant}, {args.tokens} tokens, dropout {args.dropout}; forward + backward, median of "
          f"{args.repeats}; {device})")


if __name__ == "__main__":
    main()
