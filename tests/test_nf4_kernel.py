"""peftctl's NF4 dequantisation kernel (peftctl/train/nf4_kernel.py), which the fused LoRA branch uses for a frozen
4-bit base: the same values as bitsandbytes' arithmetic, for the layouts it claims, and only those.

On the CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), against
bitsandbytes' arithmetic written out in torch (its CPU backend computes bf16 values its own way); on a GPU box it
runs compiled, against bitsandbytes' own CUDA dequantisation (tests/test_gpu.py at an 8B layer's size)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from peftctl import fast_path  # noqa: E402
from peftctl.train import fused_lora, nf4_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)


@pytest.fixture(autouse=True)
def kernel_here(monkeypatch):
    """The kernel's device rule admits this test's device (the CPU: through the interpreter)."""
    monkeypatch.setattr(fast_path, "NF4_KERNEL_DEVICES", {"cuda", DEVICE})


def _quantized(rows, cols, *, nested=True, blocksize=64, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    weight = (torch.randn(rows, cols) * 0.05).to(DEVICE, torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested)
    param = torch.nn.Parameter(packed, requires_grad=False)
    param.quant_state = state
    return param


def _bitsandbytes_arithmetic(param, dtype):
    """bitsandbytes' dequantisation written out: the high nibble first; a block's scale the 8-bit code times the
    outer scale, plus the offset (float32, each step rounded); the value NF4[nibble] * scale, rounded once."""
    state = param.quant_state
    packed = param.data.reshape(-1).to(torch.int32)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    n = state.shape[0] * state.shape[1]
    if state.nested:
        blocks = torch.arange(state.absmax.numel(), device=packed.device)
        scale = state.state2.code[state.absmax.long()] * state.state2.absmax[blocks // state.state2.blocksize]
        scale = scale + state.offset
    else:
        scale = state.absmax
    values = state.code[nibbles[:n]] * scale[torch.arange(n, device=packed.device) // state.blocksize]
    return values.to(dtype).reshape(tuple(state.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested,blocksize,shape", [(True, 64, (48, 96)), (False, 64, (48, 96)),
                                                     (True, 128, (40, 256)), (True, 64, (33, 64)),
                                                     (True, 64, (7, 100))])
def test_kernel_gives_bitsandbytes_values(nested, blocksize, shape, dtype):
    """Bit for bit, over shapes that end inside a program's span (33 x 64 = 2,112 values: a second, partial
    program), inside a quantisation block (7 x 100), and with the outer blocks of double quantisation."""
    param = _quantized(*shape, nested=nested, blocksize=blocksize)
    assert nf4_kernel.applies(param, dtype)
    out = nf4_kernel.dequantize_nf4(param, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, _bitsandbytes_arithmetic(param, dtype))


def test_the_reference_arithmetic_is_not_blind():
    """A nibble order swapped, or the offset left out, changes the values: the comparison above can fail."""
    param = _quantized(48, 96)
    expected = _bitsandbytes_arithmetic(param, torch.float32)
    swapped = torch.nn.Parameter(((param.data >> 4) | (param.data << 4)).to(torch.uint8), requires_grad=False)
    swapped.quant_state = param.quant_state
    assert not torch.equal(nf4_kernel.dequantize_nf4(swapped, torch.float32), expected)
    state = param.quant_state
    offset = state.offset
    state.offset = torch.zeros_like(offset)
    try:
        assert not torch.equal(nf4_kernel.dequantize_nf4(param, torch.float32), expected)
    finally:
        state.offset = offset


def test_only_nf4_layouts_on_the_kernel_s_devices_apply(monkeypatch):
    assert nf4_kernel.applies(_quantized(16, 64), torch.bfloat16)
    assert not nf4_kernel.applies(_quantized(16, 64, quant_type="fp4"), torch.bfloat16)
    assert not nf4_kernel.applies(_quantized(16, 64), torch.int8)
    assert not nf4_kernel.applies(torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False), torch.bfloat16)
    monkeypatch.setattr(fast_path, "NF4_KERNEL_DEVICES", set())
    assert not nf4_kernel.applies(_quantized(16, 64), torch.bfloat16)


def test_fused_branch_dequantises_an_nf4_base_through_the_kernel(monkeypatch):
    """A frozen NF4 base inside the fused branch: the kernel gives its weight for the forward product and again
    for x's gradient, and output and gradients are the eager formula's with that weight."""
    bnb = pytest.importorskip("bitsandbytes")
    calls = []
    dequantize = nf4_kernel.dequantize_nf4
    monkeypatch.setattr(nf4_kernel, "dequantize_nf4", lambda *a: (calls.append(1), dequantize(*a))[1])
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    base = base.to(DEVICE)
    weight = dequantize(base.weight, torch.float32)
    leaves = [torch.randn(2, 5, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE),
              torch.randn(32, 3, device=DEVICE)]
    fused_in = [t.clone().requires_grad_() for t in leaves]
    eager_in = [t.clone().requires_grad_() for t in leaves]
    fused = fused_lora.lora_branch(fused_in[0], None, fused_in[1], fused_in[2], 0.0, 1.7, base=base)
    assert len(calls) == 1
    x, a, b = eager_in
    eager = x @ weight.t() + 1.7 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(eager)
    (fused * weights).sum().backward()
    (eager * weights).sum().backward()
    assert len(calls) == 2
    for name, f, e in zip(("x", "A", "B"), fused_in, eager_in):
        torch.testing.assert_close(f.grad, e.grad, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
