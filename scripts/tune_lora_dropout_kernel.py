"""Tile sizes for LoRA's dropout kernels (peftctl/train/lora_dropout_kernel.py), tried one by one on the GPU.

The kernels draw the dropout mask inside the LoRA-A product. Even with their best tiles they are slower than
torch's dropout plus two GEMMs on an 8B layer's shapes (run V on an H200, BENCHMARKS.md: 315 against 197 us at
8,192 x 4,096; 704 against 569 us at 8,192 x 14,336), so the fused branch takes them only where a run needs their
memory. Their floor by memory traffic alone is about 20 us a kernel at 8,192 x 4,096 in bf16; Philox's rounds, not
memory, bound them. The script times each kernel alone, for each configuration of a grid (BLOCK_M, BLOCK_K, warps,
stages, and how many programs the split reductions aim at), beside torch's way of computing the same three results
and the tiles a run launches by default on this GPU (on a Hopper GPU the measured HOPPER_TILES), and checks that
every configuration gives those tiles' results (the same mask: it depends on the seed and each element's position
only).

    python scripts/tune_lora_dropout_kernel.py --widths 4096,14336 --tokens 8192

A CPU smoke run in Triton's interpreter (tests/test_bench.py): `TRITON_INTERPRET=1 python
scripts/tune_lora_dropout_kernel.py --device cpu --tokens 32 --widths 64 --block-m 16 --block-k 16,32 --warps 4
--stages 2 --targets 4 --repeats 1`.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import bench_lora_branch  # scripts/: the timer and the relative difference
from bench_lora_branch import _rel


def _time(fn, repeats: int, device: str) -> float:
    """Median microseconds of `fn` (bench_lora_branch's timer: warm-up calls first, CUDA events on the GPU)."""
    return bench_lora_branch._time(fn, repeats, device) * 1e3


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def torch_way(x, a, grad_h, p):
    """torch's dropout, the A product, and their backward: what the fused branch runs without the kernels."""
    dropped, mask = torch.native_dropout(x, p, True)
    h = dropped @ a.t()
    grad_x = torch.ops.aten.native_dropout_backward(grad_h @ a, mask, 1.0 / (1.0 - p))
    grad_a = grad_h.t() @ dropped
    return h, grad_x, grad_a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--widths", default="4096,14336", help="input widths (an 8B layer: 4096; down_proj: 14336)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--block-m", default="32,64,128,256")
    parser.add_argument("--block-k", default="32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--targets", default="264,528", help="programs the split reductions aim at")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--top", type=int, default=5, help="configurations shown per kernel and width")
    args = parser.parse_args()

    from peftctl.train import lora_dropout_kernel as kernel

    device = args.device
    torch.manual_seed(0)
    grid = [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=s) for m, k, w, s in
            itertools.product(_ints(args.block_m), _ints(args.block_k), _ints(args.warps), _ints(args.stages))]
    targets = _ints(args.targets)
    print(f"{len(grid)} tile configurations x {len(targets)} split targets; {args.tokens} tokens, r {args.r}, "
          f"dropout {args.dropout}, bf16, {device}")
    for width in _ints(args.widths):
        _tune_width(kernel, width, args, grid, targets)
        if device == "cuda":
            torch.cuda.empty_cache()


def _tune_width(kernel, width: int, args, grid: list[dict], targets: list[int]) -> None:
    """Every configuration of `grid` for the three kernels at this input width, against torch's way."""
    device, p = args.device, args.dropout
    x = torch.randn(args.tokens, width, device=device, dtype=torch.bfloat16)
    a = (torch.randn(args.r, width, device=device) * width ** -0.5).to(torch.bfloat16)
    grad_h = torch.randn(args.tokens, args.r, device=device, dtype=torch.bfloat16)
    seed = kernel.draw_seed(torch.device(device))
    torch_us = _time(lambda: torch_way(x, a, grad_h, p), args.repeats, device)
    runs = {
        "forward": lambda tiles, target: kernel.dropout_a_forward(x, a, seed, p, tiles=tiles, target_programs=target),
        "grad_x": lambda tiles, target: kernel.dropout_a_grad_input(grad_h, a, seed, p, torch.bfloat16, tiles=tiles),
        "grad_a": lambda tiles, target: kernel.dropout_a_grad_weight(grad_h, x, seed, p, tiles=tiles,
                                                                     target_programs=target)}
    shipped = {name: run(None, None) for name, run in runs.items()}  # what a run launches here by default
    shipped_us = {name: _time(lambda run=run: run(None, None), args.repeats, device) for name, run in runs.items()}
    print(f"\nin_features {width}: torch's dropout + GEMMs (forward and backward) {torch_us:.1f} us; the default "
          "tiles here (shipped): " + ", ".join(f"{n} {us:.1f}" for n, us in shipped_us.items())
          + f" = {sum(shipped_us.values()):.1f} us")
    best = {}
    for name, run in runs.items():
        results = []
        for tiles in grid:
            for target in targets if name != "grad_x" else [None]:  # grad_x splits nothing: one target
                try:
                    got = run(tiles, target)
                except Exception as e:  # noqa: BLE001 - out of shared memory or registers: not a candidate
                    results.append((float("inf"), tiles, target, f"failed: {type(e).__name__}"))
                    continue
                diff = _rel(got, shipped[name])
                if diff > 1e-2:  # the same mask and sums; only the order of the fp32 sums may differ
                    raise SystemExit(f"{name} {tiles} target {target}: differs from the shipped tiles "
                                     f"(relative {diff:.1e})")
                us = _time(lambda run=run, tiles=tiles, target=target: run(tiles, target), args.repeats, device)
                results.append((us, tiles, target, f"rel. diff {diff:.1e}"))
        results.sort(key=lambda item: item[0])
        best[name] = results[0]
        print(f"  {name}: best of {len(results)}")
        for us, tiles, target, note in results[:args.top]:
            print(f"    {us:9.1f} us  {tiles} target {target}  {note}")
    total = sum(item[0] for item in best.values())
    print(f"  best of each: {total:.1f} us against torch's {torch_us:.1f} us ({torch_us / total:.2f}x) and the "
          f"shipped tiles' {sum(shipped_us.values()):.1f} us")


if __name__ == "__main__":
    main()
