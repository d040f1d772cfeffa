"""Device micro-benchmark (issue 21): x's gradient through LoRA's dropout, torch's two kernels against one Triton
kernel (masked_grad_kernel.py beside it), at 8,192 tokens in bf16, inputs 4,096 and 14,336, r 16 (other
ranks with --ranks 8 16 32 64).

- torch's path, as fused_lora._TorchDropout.grad_x runs it: `grad_h @ A` (cuBLAS), then
  `native_dropout_backward(product, mask, 1 / (1 - p))`; each of the two is also timed alone;
- the kernel with its default tiles, and a sweep: each of --tiles (BLOCK_M x BLOCK_K x num_warps; the kernel wants
  BLOCK_M and BLOCK_K under 32 x num_warps) with each of --stages and --unroll; a config that fails to compile or
  to launch is reported and skipped. --gh-layouts col also times grad_h stored transposed (r x tokens, handed
  over as a strided view: a GEMM can write it so at no cost), --a-dtypes float32 A kept in fp32 (peft's own
  weight, before its cast to the activations' dtype).

Each of the kernel's results is checked against torch's path: zero wherever the mask dropped, every element
written (the output's memory is poisoned with NaN first) and max |diff| / max |torch's| under 1e-2 (torch's path
rounds twice, the kernel once). Kept elements that are zero in one result and not the other are counted
("zeros differ"); that can only be values at the rounding limit, which the max-diff check already bounds.

Timing: CUDA events around each call, the median of --reps calls after a warm-up. The calls are queued behind a
GPU sleep, so the host's launch time stays out of the events, and 256 MB are written between calls so that no call
finds the last one's mask or output in the L2 (60 MB on an H200). Bytes for GB/s: the mask, the output, grad_h and A,
each once: what the kernel must move at least.

Run from the repository root on a CUDA machine:
    python benchmarks/2026-12-02/issue21/microbench_masked_grad.py [--ranks 8 16 32 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FLUSH_BYTES = 256 * 2 ** 20
SLEEP_CYCLES = 20_000_000  # ~10 ms at the H200's 1.98 GHz: longer than the host takes to queue a config's reps
TOLERANCE = 1e-2
# Every tile here keeps BLOCK_M and BLOCK_K under 32 x num_warps (the kernel's docstring says why)
DEFAULT_SWEEP = ["32x32x2", "16x64x4", "32x64x4", "64x32x4", "64x64x4", "64x64x8", "32x128x8", "64x128x8",
                 "128x64x8", "128x128x8", "64x256x16", "128x128x16", "128x256x16", "256x128x16"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 14336], help="in_features")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiles", nargs="+", default=DEFAULT_SWEEP, help="BLOCK_MxBLOCK_KxNUM_WARPS each")
    parser.add_argument("--stages", type=int, nargs="+", default=[1])
    parser.add_argument("--unroll", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--gh-layouts", nargs="+", choices=["row", "col"], default=["row"],
                        help="grad_h as (tokens x r) rows, or a view of its (r x tokens) transpose")
    parser.add_argument("--a-dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16"])
    parser.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    return parser.parse_args(argv)


def time_us(fn, reps: int, warmup: int, flush: torch.Tensor) -> float:
    """Median GPU time of one call of fn, in microseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda._sleep(SLEEP_CYCLES)  # the GPU waits while the host queues every rep behind it
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def check(fn, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    """Run fn once on poisoned memory and compare its result with torch's path."""
    poison = torch.full_like(ref, float("nan"))  # the caching allocator hands this block to fn's output next
    del poison
    out = fn()
    torch.cuda.synchronize()
    dropped_nonzero = int((out.ne(0) & ~mask).sum())
    finite = bool(torch.isfinite(out).all())
    rel = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    zeros_differ = int((out.eq(0) != ref.eq(0)).sum())
    ok = finite and dropped_nonzero == 0 and rel < TOLERANCE
    return {"ok": ok, "rel_diff": rel, "dropped_nonzero": dropped_nonzero, "finite": finite,
            "zeros_differ": zeros_differ}


def tiles_text(tiles: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in tiles.items())


def one_case(args, kernel, tokens: int, width: int, r: int, flush: torch.Tensor) -> dict:
    p, dtype = args.p, torch.bfloat16
    scale = 1.0 / (1.0 - p)
    torch.manual_seed(0)
    grad_h = torch.randn(tokens, r, device="cuda", dtype=dtype)
    a = (torch.randn(r, width, device="cuda") * r ** -0.5).to(dtype)
    grad_hs = {"row": grad_h, "col": grad_h.t().contiguous().t()}  # the same values, stored transposed
    a_s = {"bfloat16": a, "float32": a.float()}  # the same values in fp32: the kernel's result is the same
    x = torch.randn(tokens, width, device="cuda", dtype=dtype)
    mask = torch.native_dropout(x, p, True)[1]  # torch.bool, as the forward pass keeps it
    del x
    nbytes = mask.numel() * (1 + dtype.itemsize) + (grad_h.numel() + a.numel()) * dtype.itemsize

    def torch_path():
        return torch.ops.aten.native_dropout_backward(grad_h @ a, mask, scale)

    def dropout_backward_alone(product=grad_h @ a):
        return torch.ops.aten.native_dropout_backward(product, mask, scale)

    ref = torch_path()
    assert int((ref.ne(0) & ~mask).sum()) == 0
    result = {"in_features": width, "r": r, "tokens": tokens, "p": p, "bytes": nbytes,
              "torch_us": time_us(torch_path, args.reps, args.warmup, flush),
              "gemm_us": time_us(lambda: grad_h @ a, args.reps, args.warmup, flush),
              "dropout_backward_us": time_us(dropout_backward_alone, args.reps, args.warmup, flush)}
    del dropout_backward_alone  # and the product it holds
    print(f"in {width} r {r}: torch {result['torch_us']:.1f} us (GEMM {result['gemm_us']:.1f} + "
          f"native_dropout_backward {result['dropout_backward_us']:.1f}); {nbytes / 1e6:.0f} MB the least to move",
          flush=True)

    def run_config(tiles: dict | None, label: str, gh_layout: str = "row", a_dtype: str = "bfloat16") -> dict:
        entry = {"tiles": dict(tiles) if tiles else dict(kernel.DEFAULT_TILES), "label": label,
                 "gh_layout": gh_layout, "a_dtype": a_dtype}
        gh_in, a_in = grad_hs[gh_layout], a_s[a_dtype]

        def fn():
            return kernel.masked_grad_input(gh_in, a_in, mask, p, dtype, tiles=tiles)

        started = time.perf_counter()
        try:
            entry.update(check(fn, ref, mask))  # the first call compiles
        except Exception as error:  # a config the compiler or the GPU refuses is skipped
            entry.update(ok=False, error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
                         if str(error).strip() else type(error).__name__)
            print(f"  {label:52s} skipped: {entry['error']}", flush=True)
            return entry
        entry["first_call_s"] = time.perf_counter() - started
        entry["us"] = time_us(fn, args.reps, args.warmup, flush)
        entry["gbps"] = nbytes / entry["us"] / 1e3
        verdict = "ok" if entry["ok"] else "WRONG"
        print(f"  {label:52s} {entry['us']:8.1f} us {entry['gbps']:6.0f} GB/s  rel diff {entry['rel_diff']:.1e}  "
              f"zeros differ {entry['zeros_differ']}  {verdict}", flush=True)
        return entry

    result["default"] = run_config(None, f"default ({tiles_text(kernel.DEFAULT_TILES)})")
    result["configs"] = []
    if not args.no_sweep:
        for gh_layout, a_dtype, spec, stages, unroll, prefetch in itertools.product(
                args.gh_layouts, args.a_dtypes, args.tiles, args.stages, args.unroll, args.prefetch):
            bm, bk, warps = (int(n) for n in spec.split("x"))
            tiles = {"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages, "UNROLL": unroll,
                     "PREFETCH": prefetch}
            label = f"{tiles_text(tiles)} gh {gh_layout} A {a_dtype}"
            result["configs"].append(run_config(tiles, label, gh_layout, a_dtype))
    timed = [c for c in [result["default"], *result["configs"]] if c.get("ok")]
    result["best"] = min(timed, key=lambda c: c["us"]) if timed else None
    default_us = result["default"].get("us") if result["default"].get("ok") else None
    line = f"summary in {width} r {r}: torch {result['torch_us']:.1f} us"
    line += f" | default {default_us:.1f} us" if default_us else " | default FAILED"
    if result["best"]:
        best = result["best"]
        line += (f" | best {best['us']:.1f} us ({result['torch_us'] / best['us']:.2f}x torch)"
                 f" {best['label']} at {best['gbps']:.0f} GB/s")
    else:
        line += " | no config passed its check"
    failed = [c for c in result["configs"] if not c.get("ok")]
    if failed:
        line += f" | {len(failed)} of {len(result['configs'])} swept configs skipped or wrong"
    print(line, flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("microbench_masked_grad: no CUDA device here; nothing to measure (run it on the GPU machine)",
              file=sys.stderr)
        return 0
    import triton

    import masked_grad_kernel as kernel  # beside this script: a probe, not part of peftctl

    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__};"
          f" {args.tokens} tokens, bf16, p {args.p}, median of {args.reps}", flush=True)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    started = time.perf_counter()
    results = []
    for r in args.ranks:
        for width in args.widths:
            results.append(one_case(args, kernel, args.tokens, width, r, flush))
            torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    summary = [{key: case[key] for key in ("in_features", "r", "torch_us")}
               | {"default_us": case["default"].get("us"), "best_us": (case["best"] or {}).get("us"),
                  "best": (case["best"] or {}).get("label"), "best_gbps": (case["best"] or {}).get("gbps")}
               for case in results]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": props.name, "torch": torch.__version__,
                                        "triton": triton.__version__, "tokens": args.tokens, "p": args.p,
                                        "reps": args.reps, "summary": summary, "cases": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
