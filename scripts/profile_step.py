"""Where a decoder step's GPU time goes: the Llama-3-8B decoder (cut to `--layers` layers) as peftctl trains it,
forward and backward under bf16 autocast, timed with the adapter off (the base alone), through peftctl's fused
LoRA branch, and through peft's own forward; then torch.profiler's kernels of the fused step, largest first, and
their time per decoder layer by kind (GEMM, attention, elementwise, ...). What the LoRA branch costs a layer is the
fused step less the base step; a change to the branch is worth what it takes off that.

It also reads the profiled steps' kernel timeline: how long the GPU sat idle between kernels (waiting for the host
to launch the next one), and before which kernels the waits add up. A step whose idle time is large is bound by
the host, not by the GPU's arithmetic, and fewer or cheaper launches are what would speed it up.

    python scripts/profile_step.py --targets qkvo                 # case 1's layers (bf16 base)
    python scripts/profile_step.py --targets all --quant 4bit     # case 3's layers (NF4 base)

The model is built as scripts/bench_compile.py builds it (liger's kernels, peft's LoRA r 16 / alpha 32 / dropout
0.05 in float32, the fused branch, adapter inputs left in bf16). A CPU smoke run: `--device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import statistics
import time
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


def idle_gaps(trace_path: str, top: int):
    """The GPU timeline of a chrome trace's kernels and copies: busy us (the union of their intervals), span us
    (first start to last end), the idle intervals summed by the kernel that ended each wait ([(idle us, waits,
    name)]), summed by size ([(bucket, idle us, waits)]), and the longest single waits ([(us, kernel before, kernel
    after, us since the timeline began)])."""
    import json

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    gpu = ("kernel", "gpu_memcpy", "gpu_memset")
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in gpu), key=lambda e: e["ts"])
    if not kernels:
        return 0.0, 0.0, [], [], []
    edges = [(5, "<= 5 us"), (20, "5-20 us"), (100, "20-100 us"), (float("inf"), "> 100 us")]
    buckets = {label: [0.0, 0] for _, label in edges}
    busy, end, waits, single = 0.0, kernels[0]["ts"], {}, []
    before = ""
    for e in kernels:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start > end:
            idle_us, name = start - end, e["name"][:90]
            idle, calls = waits.get(name, (0.0, 0))
            waits[name] = (idle + idle_us, calls + 1)
            label = next(label for edge, label in edges if idle_us <= edge)
            buckets[label][0] += idle_us
            buckets[label][1] += 1
            single.append((idle_us, before[:60], name[:60], start - kernels[0]["ts"]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        before = e["name"]
    ranked = sorted(((idle, calls, name) for name, (idle, calls) in waits.items()), reverse=True)
    sizes = [(label, buckets[label][0], buckets[label][1]) for _, label in edges]
    return busy, end - kernels[0]["ts"], ranked[:top], sizes, sorted(single, reverse=True)[:top]


def print_timeline(trace_path: str, top: int, per: float, unit: str, span_name: str) -> None:
    """idle_gaps' figures, printed: times in ms `unit` (each multiplied by `per`), the longest waits as they were."""
    busy, span, waits, sizes, single = idle_gaps(trace_path, top)
    print(f"GPU timeline of the profiled steps, {unit}: busy {busy * per / 1000:.3f} ms, span {span * per / 1000:.3f}"
          f" ms, idle {(span - busy) * per / 1000:.3f} ms ({(span - busy) / max(span, 1e-9):.1%})")
    print(f"idle before these kernels (ms {unit}, waits {unit}):")
    for idle, calls, name in waits:
        print(f"  {idle * per / 1000:7.3f}  {calls * per:5.1f}  {name}")
    print(f"idle by the length of a wait (ms {unit}, waits {unit}):")
    for label, idle, calls in sizes:
        print(f"  {label:10s} {idle * per / 1000:7.3f}  {calls * per:5.1f}")
    print(f"the longest waits (us; the kernel before, the kernel after; ms into {span_name}):")
    for idle, before, after, at in single:
        print(f"  {idle:8.1f}  {before} -> {after}  @ {at / 1000:.2f}")


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


def host_and_device_ms(model, hidden, grad, repeats: int):
    """Medians of (host ms to launch the forward, host ms to launch the backward, device span of the forward,
    device span of the backward), a span being from one event to the next on the stream, idle time included:
    where the host's launching takes about as long as the span, the step is host-bound (the timeline's busy time
    below says how much of the span the GPU worked)."""
    decoder = model.get_base_model().model
    rows = []
    for i in range(repeats + 3):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = decoder(inputs_embeds=hidden, use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        events[1].record()
        out.backward(grad)
        t2 = time.perf_counter()
        events[2].record()
        torch.cuda.synchronize()
        if i >= 3:
            rows.append(((t1 - t0) * 1000, (t2 - t1) * 1000, events[0].elapsed_time(events[1]),
                         events[1].elapsed_time(events[2])))
    return [statistics.median(column) for column in zip(*rows)]


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
            if device.type == "cuda":
                host_fwd, host_bwd, dev_fwd, dev_bwd = host_and_device_ms(model, hidden, grad, args.repeats)
                print(f"host launching against the device's span (ms a step): forward {host_fwd:.2f} / "
                      f"{dev_fwd:.2f}, backward {host_bwd:.2f} / {dev_bwd:.2f}")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            if device.type == "cuda":  # the timeline without the host-side recording, which slows the launches
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as timeline:
                    for _ in range(3):
                        step()
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
    if device.type == "cuda":
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            trace = os.path.join(folder, "trace.json")
            timeline.export_chrome_trace(trace)
            print_timeline(trace, args.top, per_layer, "a decoder layer", "the 3 steps")

if __name__ == "__main__":
    main()
