"""x's gradient through LoRA's dropout in one Triton kernel: `grad_x = (grad_h @ A) * mask / (1 - p)`.

torch's dropout path (peftctl/train/fused_lora.py, `_TorchDropout.grad_x`) takes two kernels: a cuBLAS GEMM that
writes `grad_h @ A` (tokens x in) and `native_dropout_backward`, which reads that product and the bool mask back
and writes the masked, scaled copy. At 8,192 tokens x 4,096 inputs in bf16 that is about 290 MB moved for a result
of 64 MB. Here one kernel reads the mask (one byte an element), grad_h and A (tokens x r and r x in: small enough
to stay in L2), and writes x's gradient once: about 100 MB.

The rank-r product is r rank-1 updates of an fp32 register tile (`acc += grad_h[:, j] * A[j, :]`), not tl.dot: with
K = r = 16 the dot's operands and accumulator were converted between register and matrix-unit layouts around a
single MMA step, and that variant (benchmarks/2026-12-02/issue21) ran at a third of the memory rate. The updates cost
r multiply-adds an element on the CUDA cores, and each step of the loop issues about 2.5 instructions a multiply-add
(the loads, bf16 -> fp32 conversions and address arithmetic around them; 64 x 64 tiles, sm_90). Measured on an H200
(8,192 tokens x 4,096 inputs, bf16; benchmarks/2026-12-02/issue21/microbench-masked-grad-*.txt) the kernel took 49 us
at r 8, 72 at r 16 and 229 at r 64, against 72, 70 and 67 for torch's two kernels: instruction issue bounds it, not
its ~100 MB (about 25 us), so it pays only at small ranks.

How the tile is laid out across threads decides the speed, and plain Triton picks the layout by itself, so the
kernel is written to lead it (see _masked_grad_kernel). The first build unrolled the r updates at compile time and
started the accumulator from tl.zeros: 62 us at best and 261 with its default tiles (register spills, or every
thread holding one column of every row and loading grad_h once a multiply-add).

The product is accumulated in fp32 and rounded once to the output's dtype, after the scale; torch's path rounds the
GEMM's result to the activations' dtype and again after the scale. Where the mask dropped, the result is exactly
0 -- also where grad_h holds inf or NaN, whose product torch's `grad * mask * scale` turns into NaN.

Element offsets into the mask and the output are int64: tokens x in may pass 2**31 (a long packed batch at an MLP's
14,336 inputs). Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported) runs the kernel on
CPU tensors.

A probe, not part of peftctl: measured on an H200 (BENCHMARKS.md, issue 21's tenth round) at torch's speed for r 16
(69.9 against 70.3 us at 4,096 inputs, 224.0 against 216.6 at 14,336), faster only at r <= ~12; dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 64 x 64 over 4 warps: 32 elements a thread (4 rows of 8 contiguous columns), so 4 loads of grad_h and one 16-byte
# load of A for 32 multiply-adds a rank; 72 registers (sm_90, triton 3.6), so seven programs share an SM. On an H200
# (8,192 tokens, r 16, bf16) 72.6 us at 4,096 inputs and 227 at 14,336, within 1% of the best of 28 tilings without
# PREFETCH; with PREFETCH and UNROLL 2, 69.9 and 224 (4% and 1% less), but at r 8 PREFETCH cost 7% (52.5 us against
# 49.2), so neither is the default. benchmarks/2026-12-02/issue21/microbench_masked_grad.py sweeps them.
DEFAULT_TILES = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1, "UNROLL": 1, "PREFETCH": 0}
_TILE_KEYS = set(DEFAULT_TILES)
_VECTOR_BYTES = 16  # the widest load or store a thread issues


@triton.jit
def _rank(ptrs, valid, EVEN: tl.constexpr):
    """One rank's slice of grad_h or A, upcast to fp32: unmasked where the tiles divide the tensor (EVEN), since a
    masked load costs a few instructions more in every step of a loop that issues about two a multiply-add."""
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=valid, other=0.0)
    # fp32 before any multiply: products of 16-bit inputs are exact, and the interpreter never multiplies bf16
    # itself (it would take the raw integers bf16 is stored in)
    return v.to(tl.float32)


@triton.jit
def _masked_grad_kernel(gh_ptr, a_ptr, mask_ptr, gx_ptr, tokens, in_features, r, stride_gm, stride_gr, stride_ar,
                        stride_ak, col_blocks, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        VEC: tl.constexpr, UNROLL: tl.constexpr, PREFETCH: tl.constexpr, EVEN_M: tl.constexpr,
                        EVEN_K: tl.constexpr):
    """One (BLOCK_M x BLOCK_K) tile of x's gradient. A 1-D grid with the column blocks varying fastest: neighbouring
    programs write neighbouring stretches of the same rows, so the stores sweep memory in order.

    Layout: Triton lays out each 2-D value after the 2-D load it grows from, and gives values that grow from none
    (tl.zeros, broadcasts of 1-D loads) a default that puts one column of every row in each thread. So the
    accumulator starts from the mask tile (times 0), and the mask's pointers claim VEC contiguous bytes (true: a
    row's columns are contiguous and BLOCK_K is a multiple of VEC), which gives the mask load the layout of the
    output's store (VEC columns a thread, 16 bytes of output): one layout from load to store, no shuffle through
    shared memory. grad_h's and A's 1-D loads then take slices of that layout, as long as each has fewer elements
    than the program has threads (BLOCK_M and BLOCK_K under 32 x num_warps); past that Triton lays them out on their
    own and converts them through shared memory in every step of the loop.

    The loop over r is a runtime loop, not unrolled at compile time: unrolled, the compiler hoists every rank's
    loads ahead of the multiply-adds and runs out of registers. UNROLL unrolls it by a few ranks instead, and one
    build serves every r."""
    pid = tl.program_id(0)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_in = rows < tokens
    col_in = cols < in_features
    offsets = rows[:, None].to(tl.int64) * in_features + cols[None, :]
    inside = row_in[:, None] & col_in[None, :]
    kept = tl.load(tl.max_contiguous(mask_ptr + offsets, [1, VEC]), mask=inside, other=0)
    acc = kept.to(tl.float32) * 0.0  # zeros, in the mask's layout (the compiler folds the multiply away)
    gh_rows = gh_ptr + rows.to(tl.int64) * stride_gm
    a_cols = a_ptr + cols * stride_ak
    if PREFETCH:
        # the next rank's slices are loaded before this rank's multiply-adds, so that their latency (A's slice
        # misses L1 in every step) hides behind them; measured on an H200 it hardly pays (see DEFAULT_TILES)
        g = _rank(gh_rows, row_in, EVEN_M)
        a = _rank(a_cols, col_in, EVEN_K)
        for j in tl.range(1, r, loop_unroll_factor=UNROLL):
            g_next = _rank(gh_rows + j * stride_gr, row_in, EVEN_M)
            a_next = _rank(a_cols + j * stride_ar, col_in, EVEN_K)
            acc += g[:, None] * a[None, :]
            g, a = g_next, a_next
        acc += g[:, None] * a[None, :]
    else:
        for j in tl.range(0, r, loop_unroll_factor=UNROLL):
            acc += _rank(gh_rows + j * stride_gr, row_in, EVEN_M)[:, None] * _rank(a_cols + j * stride_ar, col_in,
                                                                                   EVEN_K)[None, :]
    grad = tl.where(kept != 0, acc * scale, 0.0)
    tl.store(gx_ptr + offsets, grad.to(gx_ptr.dtype.element_ty), mask=inside)


def masked_grad_input(grad_h: torch.Tensor, weight_a: torch.Tensor, mask: torch.Tensor, p: float,
                      dtype: torch.dtype, *, tiles: dict | None = None) -> torch.Tensor:
    """grad_x = (grad_h @ weight_a) * mask / (1 - p) as a new contiguous (tokens x in) tensor of `dtype`.

    grad_h (tokens x r) and weight_a (r x in) in any float dtype (the activations', in fused_lora) and any strides;
    mask the torch.bool (tokens x in) that torch.native_dropout gave the forward pass, True where an input was kept.
    `tiles` replaces any of DEFAULT_TILES: BLOCK_M and BLOCK_K (powers of two; keep each under 32 x num_warps),
    num_warps, num_stages, UNROLL (how many ranks the loop over r takes a step) and PREFETCH (1: load the next
    rank's slices ahead)."""
    if grad_h.dim() != 2 or weight_a.dim() != 2 or grad_h.shape[1] != weight_a.shape[0]:
        raise ValueError(f"grad_h (tokens x r) and weight_a (r x in) expected, got {tuple(grad_h.shape)} and "
                         f"{tuple(weight_a.shape)}")
    tokens, r = grad_h.shape
    in_features = weight_a.shape[1]
    if mask.dtype != torch.bool or tuple(mask.shape) != (tokens, in_features):
        raise ValueError(f"a torch.bool mask of shape {(tokens, in_features)} expected, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability in [0, 1) expected, got {p}")
    unknown = set(tiles or {}) - _TILE_KEYS
    if unknown:
        raise ValueError(f"unknown tile settings {sorted(unknown)}; known: {sorted(_TILE_KEYS)}")
    grad_x = torch.empty(tokens, in_features, device=grad_h.device, dtype=dtype)
    if grad_x.numel() == 0:
        return grad_x
    if r == 0:
        return grad_x.zero_()
    blocks = {**DEFAULT_TILES, **(tiles or {})}
    # Triton's pointer to torch.bool is a pointer to i1; the same bytes as uint8 load as plain bytes everywhere.
    mask_bytes = mask.contiguous().view(torch.uint8)
    vec = min(_VECTOR_BYTES // grad_x.element_size(), blocks["BLOCK_K"])
    col_blocks = triton.cdiv(in_features, blocks["BLOCK_K"])
    grid = (triton.cdiv(tokens, blocks["BLOCK_M"]) * col_blocks,)
    _masked_grad_kernel[grid](grad_h, weight_a, mask_bytes, grad_x, tokens, in_features, r, grad_h.stride(0),
                              grad_h.stride(1), weight_a.stride(0), weight_a.stride(1), col_blocks, 1.0 / (1.0 - p),
                              VEC=vec, EVEN_M=tokens % blocks["BLOCK_M"] == 0,
                              EVEN_K=in_features % blocks["BLOCK_K"] == 0, **blocks)
    return grad_x
