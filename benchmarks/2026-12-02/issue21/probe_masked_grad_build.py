"""Device probe (issue 21): what Triton built of masked_grad_kernel.py beside it on this GPU, per tile:
registers and spills a thread, shared memory, the layouts in its TTGIR and how many layout conversions remain (0 is
the design: one layout from the mask's load to the output's store; see the kernel's docstring). Writes each TTGIR to
--dump if given. Run from the repository root on a CUDA machine:
    python benchmarks/2026-12-02/issue21/probe_masked_grad_build.py [--dump DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

TILES = ["64x64x4", "32x64x4", "64x128x8", "128x128x8", "64x256x16", "128x64x4", "64x128x4"]  # last two: too wide


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--tiles", nargs="+", default=TILES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("probe_masked_grad_build: no CUDA device here", file=sys.stderr)
        return 0
    import triton

    import masked_grad_kernel as kernel  # beside this script: a probe, not part of peftctl

    print(f"{torch.cuda.get_device_name()}; triton {triton.__version__}")
    tokens, width, r = 8192, 4096, 16
    grad_h = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, width, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(tokens, width, device="cuda") > 0.05
    real = kernel._masked_grad_kernel
    for spec in args.tiles:
        for unroll in (1, 2):
            bm, bk, warps = (int(n) for n in spec.split("x"))
            built = []

            class Spy:
                def __getitem__(self, grid, built=built):
                    return lambda *a, **k: built.append(real[grid](*a, **k))

            kernel._masked_grad_kernel = Spy()
            try:
                kernel.masked_grad_input(grad_h, a, mask, 0.05, torch.bfloat16,
                                         tiles={"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps, "UNROLL": unroll})
            finally:
                kernel._masked_grad_kernel = real
            compiled = built[0]
            ttgir = compiled.asm["ttgir"]
            layouts = re.findall(r"^#\w+ = #ttg\.blocked<\{(.*)\}>$", ttgir, re.M)
            print(f"{spec} unroll {unroll}: {compiled.n_regs} registers, {compiled.n_spills} spilled, "
                  f"{compiled.metadata.shared} B shared, {ttgir.count('ttg.convert_layout')} layout conversions; "
                  f"layouts: {' | '.join(layouts)}", flush=True)
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"masked_grad_{spec}_u{unroll}.ttgir").write_text(ttgir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
