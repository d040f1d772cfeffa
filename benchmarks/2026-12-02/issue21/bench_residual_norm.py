"""Do the residual sums inside the norms pay? (Measured and dropped, issue 21's eleventh round: runs AF-AH.) The decoder of the Llama-3-8B shape (cut to `--layers` layers), as
peftctl trains it (scripts/bench_compile.py builds it: liger's kernels, LoRA through the fused branch), one step
being the decoder's forward and backward under bf16 autocast. The same model takes turns with its decoder layers
stock and routed through residual_norm_probe.py (beside this script), step by step (`--repeats` pairs); prints the median step
of each, the ratio and how many pairs the routed step won, and checks the two compute the same: the same dropout
masks (the same seed), the forward output bit for bit, the adapter's gradients close.

    PYTHONPATH=$PWD/.gpu-site:$PWD:$PWD/scripts:$PWD/benchmarks/2026-12-02/issue21 \
        python benchmarks/2026-12-02/issue21/bench_residual_norm.py --layers 4 --targets qkvo   # case 1's layers
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import bench_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--targets", choices=["qkvo", "all"], default="qkvo")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=40, help="timed pairs of steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    args.tiny = False
    device = torch.device("cuda")
    from residual_norm_probe import fuse_residual_norms

    model, kernels, fused = bench_compile.build(args, device)
    layers = model.get_base_model().model.layers
    stock_class = type(layers[0])
    assert fuse_residual_norms(model.get_base_model(), device) == args.layers, "the layers were not routed"
    routed_class = type(layers[0])

    def use(cls):
        for layer in layers:
            layer.__class__ = cls

    width = model.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(args.rows, args.tokens, width, generator=gen).to(device, torch.bfloat16)
    grad = (torch.randn(args.rows, args.tokens, width, generator=gen) * 1e-3).to(device, torch.bfloat16)
    step = bench_compile.step_fn(model, hidden, grad, device)

    def outputs(cls):
        use(cls)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks both ways
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.get_base_model().model(inputs_embeds=hidden, use_cache=False).last_hidden_state
        out.backward(grad.clone())  # liger's final norm writes its input gradient over the one it is given
        return out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    (out_stock, grads_stock), (out_routed, grads_routed) = outputs(stock_class), outputs(routed_class)
    same_output = torch.equal(out_stock, out_routed)
    cosine = torch.nn.functional.cosine_similarity(grads_stock, grads_routed, dim=0).item()
    norm_ratio = (grads_routed.norm() / grads_stock.norm()).item()

    # The two take turns step by step, each step timed by CUDA events: the clock's drift over a run (the rounds of
    # run AF moved by 10%) falls on both alike.
    times = {"stock": [], "routed": []}
    for i in range(args.warmup + args.repeats):
        for name, cls in (("stock", stock_class), ("routed", routed_class)):
            use(cls)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(start.elapsed_time(end) / 1000)
    stock_s, routed_s = (statistics.median(times[k]) for k in ("stock", "routed"))
    wins = sum(r < s for s, r in zip(times["stock"], times["routed"]))
    result = {"device": torch.cuda.get_device_name(), "layers": args.layers, "targets": args.targets,
              "tokens": args.rows * args.tokens, "kernels": kernels, "fused_lora_layers": fused,
              "stock_step_ms": stock_s * 1000, "routed_step_ms": routed_s * 1000, "ratio": stock_s / routed_s,
              "steps_ms": {k: [round(t * 1000, 3) for t in v] for k, v in times.items()},
              "routed_faster_in_pairs": f"{wins}/{args.repeats}",
              "output_bit_for_bit": same_output, "grad_cosine": cosine, "grad_norm_ratio": norm_ratio}
    print(f"decoder of {args.layers} layers, LoRA on {args.targets}, {result['tokens']} tokens: stock "
          f"{result['stock_step_ms']:.2f} ms, residual norms {result['routed_step_ms']:.2f} ms a step -> "
          f"{result['ratio']:.4f}x ({(stock_s - routed_s) / args.layers * 1e6:.0f} us a layer); the routed step "
          f"faster in {wins} of {args.repeats} pairs")
    print(f"same forward bit for bit: {same_output}; adapter gradients cosine {cosine:.7f}, norm ratio "
          f"{norm_ratio:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
