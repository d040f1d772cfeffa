"""Triton kernels that draw LoRA's dropout mask inside the LoRA-A product, so no dropped copy of x is ever written.

peft computes `h = dropout_p(x) @ A^T` with torch's dropout, which writes a masked copy of x and a mask, both kept
for the backward pass -- for every adapted layer, although q, k and v read the same x. Here the mask is a function
of a seed and each element's position (Philox: `tl.rand(seed, row * in_features + col)`), so it is drawn again
wherever it is needed instead of being stored:

- forward: `h = (x * m / (1-p)) @ A^T`, reading x once and writing only h (tokens x r);
- backward: `grad_x = (grad_h @ A) * m / (1-p)` (needs no read of x) and `grad_A = grad_h^T @ (x * m / (1-p))`.

Kept for the backward pass: x itself (the very tensor the layer got, so siblings share it), the seed, h.

The seed is drawn with torch.randint on x's device and read by the kernels with tl.load: no host sync, and
`torch.manual_seed` or activation checkpointing's RNG restore reproduce the same mask. Element offsets are int32:
callers keep tokens x in_features below 2**31 (peftctl/fast_path.py decides where the kernels apply).

Triton's interpreter (TRITON_INTERPRET=1, set before triton is first imported) runs the same kernels on CPU
tensors; the tests use it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TARGET_PROGRAMS = 256  # about two waves of an H200's 132 SMs: how far grad_A's reduction over tokens is split


@triton.jit
def _keep(seed, rows, k0, in_features, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The mask of columns k0 .. k0 + BLOCK_K: an element is kept where its Philox uniform is at least p (probability
    1 - p). One Philox call gives four uniforms, so a counter covers four neighbouring columns of a row (counter
    row * ceil(in / 4) + col // 4): a quarter of the generator's work, which the kernels pay in every pass, as
    torch's dropout kernel does (it also draws four per call)."""
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None] * tl.cdiv(in_features, 4) + quads[None, :])
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_M, BLOCK_K))  # each quad's 4 beside it
    return u >= p


@triton.jit
def _dropped_tile(x_ptr, rows, cols, k0, row_end, col_end, stride_xm, stride_xk, seed, in_features, p, scale,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dropped-out tile x[rows, cols] * mask / (1 - p), columns from k0: scaled in fp32 and rounded once to x's
    dtype, as torch's dropout kernel does. The forward and grad_A kernels both read x through it."""
    inside = (rows[:, None] < row_end) & (cols[None, :] < col_end)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=inside, other=0.0)
    keep = _keep(seed, rows, k0, in_features, p, BLOCK_M, BLOCK_K)
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST (Triton's interpreter only): its tl.dot multiplies bf16 as the raw integers
    it stores them in (triton 3.9), so the operands go up to fp32 first -- the same products, exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee" if IEEE else None)


@triton.jit
def _forward_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, tokens, in_features, r, stride_xm, stride_xk, cols_per_split, p,
                    scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One (BLOCK_M x r) tile of h, summed over one split of the input columns, in fp32; the splits are added up
    after."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    first = split * cols_per_split
    end = tl.minimum(first + cols_per_split, in_features)
    for k0 in range(first, end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        dropped = _dropped_tile(x_ptr, rows, cols, k0, tokens, end, stride_xm, stride_xk, seed, in_features, p,
                                scale, BLOCK_M, BLOCK_K)
        a_t = tl.load(a_ptr + ranks[None, :] * in_features + cols[:, None],
                      mask=(ranks[None, :] < r) & (cols[:, None] < end), other=0.0)
        acc += _dot(dropped, a_t, IEEE, UPCAST)
    tl.store(h_ptr + split * tokens * r + rows[:, None] * r + ranks[None, :], acc,
             mask=(rows[:, None] < tokens) & (ranks[None, :] < r))


@triton.jit
def _grad_input_kernel(gh_ptr, a_ptr, gx_ptr, seed_ptr, tokens, in_features, r, p, scale,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    gh = tl.load(gh_ptr + rows[:, None] * r + ranks[None, :], mask=(rows[:, None] < tokens) & (ranks[None, :] < r),
                 other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :],
                mask=(ranks[:, None] < r) & (cols[None, :] < in_features), other=0.0)
    acc = _dot(gh, a, IEEE, UPCAST)
    seed = tl.load(seed_ptr)
    keep = _keep(seed, rows, tl.program_id(1) * BLOCK_K, in_features, p, BLOCK_M, BLOCK_K)
    grad = tl.where(keep, acc * scale, 0.0)
    tl.store(gx_ptr + rows[:, None].to(tl.int64) * in_features + cols[None, :], grad.to(gx_ptr.dtype.element_ty),
             mask=(rows[:, None] < tokens) & (cols[None, :] < in_features))


@triton.jit
def _grad_weight_kernel(gh_ptr, x_ptr, ga_ptr, seed_ptr, tokens, in_features, r, stride_xm, stride_xk,
                        rows_per_split, p, scale,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                        UPCAST: tl.constexpr):
    """One (r x BLOCK_K) slice of grad_A, summed over one split of the tokens; the splits are added up after."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    end = tl.minimum(first + rows_per_split, tokens)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        gh_t = tl.load(gh_ptr + rows[None, :] * r + ranks[:, None], mask=(rows[None, :] < end) & (ranks[:, None] < r),
                       other=0.0)
        dropped = _dropped_tile(x_ptr, rows, cols, tl.program_id(0) * BLOCK_K, end, in_features, stride_xm,
                                stride_xk, seed, in_features, p, scale, BLOCK_M, BLOCK_K)
        acc += _dot(gh_t, dropped, IEEE, UPCAST)
    tl.store(ga_ptr + split * r * in_features + ranks[:, None] * in_features + cols[None, :], acc,
             mask=(ranks[:, None] < r) & (cols[None, :] < in_features))


def _blocks(r: int, dtype: torch.dtype, tiles: dict | None = None) -> dict:
    """Tile sizes and pipeline depth: tl.dot needs every side a power of two of at least 16; a wider r gets fewer
    rows per program so that its fp32 accumulator stays in registers. float32 tiles take twice the shared memory:
    narrower and two stages keep every kernel under 64 KiB (compiled for sm_90: at most 48 KiB), which any card
    since Turing has; 16-bit tiles stay under 48 KiB with Triton's default three stages. `tiles` (BLOCK_M,
    BLOCK_K, num_warps, num_stages) replaces any of them: scripts/tune_lora_dropout_kernel.py tries others."""
    block_r = max(16, triton.next_power_of_2(r))
    if dtype == torch.float32:
        blocks = {"BLOCK_M": 64 if block_r <= 32 else 32 if block_r <= 128 else 16, "BLOCK_K": 32,
                  "BLOCK_R": block_r, "num_stages": 2}
    else:
        blocks = {"BLOCK_M": 128 if block_r <= 32 else 64 if block_r <= 128 else 32, "BLOCK_K": 64,
                  "BLOCK_R": block_r}
    return {**blocks, **(tiles or {})}


# Tiles measured fastest on an H200 (scripts/tune_lora_dropout_kernel.py: 8,192 tokens, r 16, bf16; BENCHMARKS.md,
# run V), against the shipped ones: 17-25% less time a kernel at 4,096 input columns, 6-16% at 14,336. Per kernel,
# for inputs narrower than WIDE columns (an 8B model's 4,096) and wider (its MLP's 14,336): (BLOCK_M, BLOCK_K,
# num_warps, num_stages, programs the split reduction aims at). Other GPUs, ranks and dtypes keep _blocks' tiles: the
# best tiles depend on the card, and these were measured on one (all compile within 20 KiB of shared memory).
HOPPER_TILES = {
    ("forward", False): (64, 128, 8, 4, 264), ("forward", True): (64, 64, 4, 3, 528),
    ("grad_x", False): (64, 64, 4, 3, None), ("grad_x", True): (128, 64, 4, 4, None),
    ("grad_a", False): (64, 64, 4, 3, 528), ("grad_a", True): (128, 32, 4, 3, 528),
}
WIDE = 8192


def _config(kernel: str, x: torch.Tensor, r: int, in_features: int, tiles: dict | None,
            target_programs: int | None) -> tuple[dict, int]:
    """(the launch's blocks, the split reduction's target): the measured tiles where they were measured (16-bit,
    r <= 16, a Hopper GPU) unless the caller names its own, else _blocks'."""
    blocks = _blocks(r, x.dtype, tiles)
    target = target_programs or _TARGET_PROGRAMS
    if tiles is None and x.dtype in (torch.bfloat16, torch.float16) and r <= 16 and hopper(x.device):
        m, k, warps, stages, tuned_target = HOPPER_TILES[kernel, in_features >= WIDE]
        blocks.update(BLOCK_M=m, BLOCK_K=k, num_warps=warps, num_stages=stages)
        target = target_programs or tuned_target or target
    return blocks, target


def hopper(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9 (H100, H200), where HOPPER_TILES were measured."""
    return device.type == "cuda" and _capability(device.index if device.index is not None else
                                                 torch.cuda.current_device())[0] == 9


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _precision(t: torch.Tensor) -> dict:
    """float32 in full precision, as torch's own float32 matmul (not TF32); the interpreter's bf16 workaround."""
    return {"IEEE": t.dtype == torch.float32, "UPCAST": t.device.type == "cpu"}


def draw_seed(device: torch.device) -> torch.Tensor:
    """A seed from torch's generator on `device`, left there: the kernels read it, the host never waits for it."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def dropout_a_forward(x2: torch.Tensor, weight_a: torch.Tensor, seed: torch.Tensor, p: float, *,
                      tiles: dict | None = None, target_programs: int | None = None) -> torch.Tensor:
    """h = (x2 * mask / (1-p)) @ weight_a^T for 2-D x2 (tokens x in) and weight_a (r x in) of x2's dtype.

    A few thousand tokens make few row blocks (8,192 / 128 = 64 programs for 132 SMs), so the input columns are
    split as well; each split writes its own fp32 partial h (tokens x r: small) and the splits are added in a fixed
    order."""
    tokens, in_features = x2.shape
    r = weight_a.shape[0]
    a = weight_a.contiguous()
    blocks, target = _config("forward", x2, r, in_features, tiles, target_programs)
    row_blocks = triton.cdiv(tokens, blocks["BLOCK_M"])
    splits, cols_per_split = _split(in_features, blocks["BLOCK_K"], row_blocks, target)
    partial = torch.empty(splits, tokens, r, device=x2.device, dtype=torch.float32)
    _forward_kernel[(row_blocks, splits)](
        x2, a, partial, seed, tokens, in_features, r, x2.stride(0), x2.stride(1), cols_per_split, p,
        1.0 / (1.0 - p), **blocks, **_precision(x2))
    return (partial[0] if splits == 1 else partial.sum(0)).to(x2.dtype)


def _split(length: int, block: int, programs: int, target: int = _TARGET_PROGRAMS) -> tuple[int, int]:
    """(splits, length per split): enough splits of `length` (in whole blocks, at least 4 blocks each) for about
    `target` programs in all, when `programs` others run beside each split."""
    blocks = triton.cdiv(length, block)
    splits = max(1, min(triton.cdiv(target, programs), blocks // 4))
    per_split = block * triton.cdiv(blocks, splits)
    return triton.cdiv(length, per_split), per_split


def dropout_a_grad_input(grad_h: torch.Tensor, weight_a: torch.Tensor, seed: torch.Tensor, p: float,
                         dtype: torch.dtype, *, tiles: dict | None = None) -> torch.Tensor:
    """grad_x = (grad_h @ weight_a) * mask / (1-p), the mask drawn again from the seed (x is not read)."""
    tokens, r = grad_h.shape
    in_features = weight_a.shape[1]
    gh, a = grad_h.contiguous(), weight_a.contiguous()
    grad_x = torch.empty(tokens, in_features, device=gh.device, dtype=dtype)
    blocks, _ = _config("grad_x", gh, r, in_features, tiles, None)
    grid = (triton.cdiv(tokens, blocks["BLOCK_M"]), triton.cdiv(in_features, blocks["BLOCK_K"]))
    _grad_input_kernel[grid](gh, a, grad_x, seed, tokens, in_features, r, p, 1.0 / (1.0 - p), **blocks,
                             **_precision(gh))
    return grad_x


def dropout_a_grad_weight(grad_h: torch.Tensor, x2: torch.Tensor, seed: torch.Tensor, p: float, *,
                          tiles: dict | None = None, target_programs: int | None = None) -> torch.Tensor:
    """grad_A = grad_h^T @ (x2 * mask / (1-p)) in float32 (r x in), reading x2 once.

    Few column blocks (in_features / 64) would leave most of the GPU idle, so the tokens are split as well; each
    split writes its own partial sum and the splits are added in a fixed order (deterministic, no atomics)."""
    tokens, in_features = x2.shape
    r = grad_h.shape[1]
    gh = grad_h.contiguous()
    blocks, target = _config("grad_a", x2, r, in_features, tiles, target_programs)
    block_m = blocks["BLOCK_M"]
    col_blocks = triton.cdiv(in_features, blocks["BLOCK_K"])
    splits, rows_per_split = _split(tokens, block_m, col_blocks, target)
    partial = torch.empty(splits, r, in_features, device=x2.device, dtype=torch.float32)
    _grad_weight_kernel[(col_blocks, splits)](
        gh, x2, partial, seed, tokens, in_features, r, x2.stride(0), x2.stride(1), rows_per_split, p,
        1.0 / (1.0 - p), **blocks, **_precision(x2))
    return partial[0] if splits == 1 else partial.sum(0)
