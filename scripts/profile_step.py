"""Where a decoder step's GPU time goes: the Llama-3-8B decoder (cut to `--layers` layers) as peftctl trains it,
forward and backward under bf16 autocast, timed with the adapter off (the base alone), through peftctl's fused
LoRA branch, and through peft's own forward; then torch.profiler's kernels of the fused step, largest first, and
their time per decoder layer by kind (GEMM, attention, elementwise, ...). What the LoRA branch costs a layer is the
fused step less the base step; a change to the branch is worth what it takes off that.

    python scripts/profile_step.py --targets qkvo                 # case 1's layers (bf16 base)
    python scripts/profile_step.py --targets all --quant 4bit     # case 3's layers (NF4 base)

The model is built as scripts/bench_compile.py builds it (liger's kernels, peft's LoRA r 16 / alpha 32 / dropout
0.05 in float32, the fused branch, adapter inputs left in bf16). A CPU smoke run: `--device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import statistics
import types

import torch

import bench_compile

KINDS = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere", "splitk", "sgemm", "matmul", "mm")),
         ("attention", ("flash", "fmha", "attention")),
         ("nf4 dequant", ("dequant", "kdequantize")),
         ("liger", ("_rms_norm", "_rope", "_swiglu", "silu", "rope")),
         ("dropout", ("dropout", "fused_dropout", "philox")),
         ("sum/copy", ("add", "copy", "cat", "fill", "mul", "elementwise", "vectorized", "reduce"))]


def kind(name: str) -> str:
    low = name.lower()
    for label, keys in KINDS:
        if any(k in low for k in keys):
            return label
    return "other"


def quantize_decoder(model) -> int:
    """Every linear layer of the decoder as a bitsandbytes NF4 layer (bf16 compute), as a 4-bit load gives."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(child.weight.device))
                    count += 1
    return count


def build(args, device, fused: bool):
    """bench_compile's model; with --quant 4bit the decoder's linear layers are NF4 before peft wraps them."""
    if args.quant == "4bit":
        from transformers import LlamaForCausalLM

        original = LlamaForCausalLM.to

        def to_then_quantize(self, *a, **k):
            out = original(self, *a, **k)
            quantize_decoder(out)
            return out

        LlamaForCausalLM.to = to_then_quantize
        try:
            model, kernels, routed = bench_compile.build(args, device)
        finally:
            LlamaForCausalLM.to = original
    else:
        model, kernels, routed = bench_compile.build(args, device)
    if not fused:  # peft's own forward on every layer
        for module in model.modules():
            if isinstance(getattr(module, "forward", None), types.MethodType) and "forward" in vars(module):
                del module.forward
    return model, kernels, routed


def median_ms(step, repeats: int, device) -> float:
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            step()
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--targets", choices=["qkvo", "all"], default="qkvo")
    parser.add_argument("--quant", choices=["none", "4bit"], default="none")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=30, help="kernels listed")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (smoke runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    figures = {}
    for way in ("fused", "peft"):
        model, kernels, routed = build(args, device, fused=way == "fused")
        width = model.config.hidden_size
        gen = torch.Generator(device="cpu").manual_seed(1)
        hidden = torch.randn(args.rows, args.tokens, width, generator=gen).to(device, dtype).requires_grad_(True)
        grad = (torch.randn(args.rows, args.tokens, width, generator=gen) * 1e-3).to(device, dtype)
        step = bench_compile.step_fn(model, hidden, grad, device)
        figures[way] = median_ms(step, args.repeats, device)
        if way == "fused":
            with model.disable_adapter():
                figures["base"] = median_ms(step, args.repeats, device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    per_layer = 1.0 / (3 * args.layers)  # three profiled steps
    print(f"decoder of {args.layers} layers ({args.quant}, LoRA on {args.targets}), {args.rows} x {args.tokens} "
          f"tokens, {device.type}; kernels {kernels}; fused branch on {routed} layers")
    for way in ("base", "fused", "peft"):
        print(f"  {way:6s} {figures[way]:8.2f} ms a step, {figures[way] / args.layers:6.3f} ms a decoder layer")
    print(f"  the LoRA branch: fused {(figures['fused'] - figures['base']) / args.layers:.3f} ms a decoder layer, "
          f"peft {(figures['peft'] - figures['base']) / args.layers:.3f}")
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_device_time_total
    print(f"device time a decoder layer (forward + backward): {total * per_layer / 1000:.3f} ms")
    for label, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {label:12s} {us * per_layer / 1000:7.3f} ms  {us / total:6.1%}")
    print(f"top {args.top} kernels (ms a decoder layer, calls a layer):")
    for e in events[:args.top]:
        print(f"  {e.self_device_time_total * per_layer / 1000:7.3f}  {e.count * per_layer:5.1f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
