"""One Triton kernel that dequantises a bitsandbytes NF4 weight, nested statistics included.

A QLoRA layer dequantises its frozen 4-bit weight twice a step: for the forward product and again for x's gradient.
bitsandbytes does it in three launches -- the 8-bit block scales (double quantisation), their offset, then the
4-bit values -- each through a torch.library operator implemented in Python. The GPU work is small (about 40 us for
an 8B MLP weight); the host's is not, and on a long QLoRA batch the host launching kernels is what the GPU waits
for (measured on an H200: a case-3 step was busy 483 ms of about 560). Here it is one launch, with the same
arithmetic in the same order, so the same bits:

- scale of block b = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset (float32; rounded after the product
  and after the sum, as bitsandbytes' two kernels round -- no fused multiply-add);
- value i = NF4[nibble i] * scale[i // blocksize], rounded once to the output dtype. A byte holds two values, the
  high nibble first. NF4 is bitsandbytes' built-in table (its CUDA kernel ignores the quant state's `code`).

Only the layouts bitsandbytes writes for NF4 are taken (`applies`: uint8 storage, contiguous, every statistic on the
weight's device, dequantised to the dtype the weight was quantised from, so that bitsandbytes, too, rounds once);
anything else goes through bitsandbytes.
Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors: the tests compare it there with
bitsandbytes' arithmetic written out in torch, and on the GPU with bitsandbytes' own CUDA dequantisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

VALUES = 1024  # values per program: 16 blocks at bitsandbytes' default blocksize of 64
WARPS = 2  # measured best at that size on an H200 (benchmarks/2026-12-01/issue21/microbench_nf4_dequant.py)
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4"), the constants of its CUDA kernel)
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_TABLES: dict = {}  # device -> NF4 as a float32 tensor there


@triton.jit
def _dequantize_nf4(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr, n_values,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                    OUT_BF16: tl.constexpr, BLOCKS: tl.constexpr):
    """BLOCKS quantisation blocks of BLOCKSIZE values each, laid out one block a row: a block's scale is read and
    computed once, and a row's BLOCKSIZE / 2 bytes hold its values two by two."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = block * BLOCKSIZE < n_values
    if NESTED:
        scale_q = tl.load(absmax_ptr + block, mask=live, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + scale_q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=live, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=live, other=0.0)
    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    q = tl.load(packed_ptr + byte, mask=2 * byte < n_values, other=0).to(tl.int32)
    high = tl.load(table_ptr + (q >> 4)) * scale[:, None]
    low = tl.load(table_ptr + (q & 15)) * scale[:, None]
    values = tl.reshape(tl.join(high, low), (BLOCKS, BLOCKSIZE))  # high, low, high, low: the values' order
    if OUT_BF16:  # round to nearest even by hand: Triton's interpreter truncates in its own bf16 cast
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = values.to(out_ptr.dtype.element_ty)
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + index, rounded, mask=index < n_values)


# A frozen weight's verdict on its layout, asked twice a step per 4-bit layer (three times under checkpointing):
# the checks cost 20-30 us of host time a call, and a one-row QLoRA step is bound by the host (672 calls a step on
# the 8B shape). Kept while everything the checks read is unchanged: the objects (compared by identity, as a
# tensor's == compares elements; QuantState.to and an assignment replace them) and the values (the weight's
# storage, dtype, shape and strides; the state's type, dtype, block size, shape and nesting).
_LAYOUTS = WeakIdKeyDictionary()


def applies(weight, dtype) -> bool:
    """Whether `weight` (a bitsandbytes Params4bit) is a layout this kernel reads the way bitsandbytes does -- NF4
    in contiguous uint8 storage, float32 block scales or 8-bit nested ones, every statistic contiguous on the
    weight's device, `dtype` the one it was quantised from, value offsets within int32 -- on a device it runs on
    (peftctl/fast_path.py)."""
    from peftctl import fast_path

    if not fast_path.nf4_kernel_applies(weight.device.type):
        return False
    state = getattr(weight, "quant_state", None)
    inner = getattr(state, "state2", None)
    objects = (state, getattr(state, "absmax", None), inner, getattr(inner, "absmax", None),
               getattr(inner, "code", None), getattr(state, "offset", None))
    values = (dtype, weight.data_ptr(), weight.dtype, weight.shape, weight.stride(),
              *(getattr(state, name, None) for name in ("quant_type", "dtype", "blocksize", "shape", "nested")))
    known = _LAYOUTS.get(weight)
    if (known is not None and known[1] == values
            and all(now is then for now, then in zip(objects, known[0], strict=True))):
        return known[2]
    verdict = _layout_applies(weight, dtype, state)
    _LAYOUTS[weight] = (objects, values, verdict)
    return verdict


def _layout_applies(weight, dtype, state) -> bool:
    if (state is None or state.quant_type != "nf4" or dtype != state.dtype
            or dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or weight.dtype != torch.uint8 or not weight.is_contiguous()):
        return False
    n_values, blocksize = math.prod(state.shape), state.blocksize
    if blocksize < 2 or blocksize & (blocksize - 1) or n_values + _blocks(blocksize) * blocksize >= 2**31:
        return False

    def here(t, dtype_, numel=None):
        return (isinstance(t, torch.Tensor) and t.dtype == dtype_ and t.device == weight.device and t.is_contiguous()
                and (numel is None or t.numel() == numel))

    if state.nested:
        inner = state.state2
        return (here(state.absmax, torch.uint8) and here(inner.absmax, torch.float32)
                and here(inner.code, torch.float32, 256) and here(state.offset, torch.float32, 1))
    return here(state.absmax, torch.float32)


def _blocks(blocksize: int, values: int = VALUES) -> int:
    """Quantisation blocks per program: about `values` values, at least one block."""
    return max(1, values // blocksize)


def dequantize_nf4(weight, dtype, *, values: int = VALUES, warps: int = WARPS) -> torch.Tensor:
    """The (out x in) matrix of an NF4 Params4bit in `dtype`, as bitsandbytes' `dequantize_4bit` gives it (where
    `applies`). `values` and `warps` size the programs (the micro-benchmark varies them)."""
    state = weight.quant_state
    out = torch.empty(tuple(state.shape), dtype=dtype, device=weight.device)
    n_values = out.numel()
    nested = bool(state.nested)
    absmax = state.absmax
    code2 = state.state2.code if nested else absmax  # unread where not nested
    absmax2 = state.state2.absmax if nested else absmax
    offset = state.offset if nested else absmax
    table = _TABLES.get(weight.device)
    if table is None:
        table = _TABLES[weight.device] = torch.tensor(NF4, dtype=torch.float32, device=weight.device)
    blocks = _blocks(state.blocksize, values)
    grid = (triton.cdiv(n_values, blocks * state.blocksize),)
    _dequantize_nf4[grid](weight.data, absmax, code2, absmax2, offset, table, out, n_values,
                          BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.state2.blocksize if nested else 1,
                          NESTED=nested, OUT_BF16=dtype == torch.bfloat16, BLOCKS=blocks, num_warps=warps,
                          enable_fp_fusion=False)
    return out
