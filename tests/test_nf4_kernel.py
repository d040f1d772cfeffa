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


def _quantized(rows, cols, *, nested=True, blocksize=64, quant_type="nf4", dtype=torch.bfloat16, seed=0,
               storage=torch.uint8):
    """A Params4bit-like parameter: packed values with their quant_state, quantised from a `dtype` weight."""
    torch.manual_seed(seed)
    weight = (torch.randn(rows, cols) * 0.05).to(DEVICE, dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=nested, quant_storage=storage)
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
    table = torch.tensor(nf4_kernel.NF4, device=packed.device)
    values = table[nibbles[:n]] * scale[torch.arange(n, device=packed.device) // state.blocksize]
    return values.to(dtype).reshape(tuple(state.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested,blocksize,shape", [(True, 64, (48, 96)), (False, 64, (48, 96)),
                                                     (True, 128, (40, 256)), (True, 64, (33, 64)),
                                                     (True, 64, (7, 100))])
def test_kernel_gives_bitsandbytes_values(nested, blocksize, shape, dtype):
    """Bit for bit, over shapes that end inside a program's span (33 x 64 = 2,112 values: a second, partial
    program), inside a quantisation block (7 x 100), and with the outer blocks of double quantisation."""
    param = _quantized(*shape, nested=nested, blocksize=blocksize, dtype=dtype)
    assert nf4_kernel.applies(param, dtype)
    out = nf4_kernel.dequantize_nf4(param, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, _bitsandbytes_arithmetic(param, dtype))


def test_the_kernel_sees_the_nibble_order_and_the_offset():
    """A nibble order swapped, or the nested scales' offset left out, changes the values: the kernel reads both."""
    param = _quantized(48, 96, dtype=torch.float32)
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


def test_a_large_blocksize_is_read_in_programs_of_one_block():
    param = _quantized(8, 1024, blocksize=4096, dtype=torch.float32)
    assert nf4_kernel.applies(param, torch.float32)
    assert torch.equal(nf4_kernel.dequantize_nf4(param, torch.float32),
                       _bitsandbytes_arithmetic(param, torch.float32))


def test_only_layouts_read_as_bitsandbytes_reads_them_apply(monkeypatch):
    """Refused, so that bitsandbytes dequantises them: FP4; another dtype than the weight was quantised from
    (bitsandbytes would round twice); 16-bit packed storage (FSDP-QLoRA's layout); a strided view of the packed
    bytes; nested scales on another dtype; a device outside the kernel's rule; anything without a quant state."""
    assert nf4_kernel.applies(_quantized(16, 64), torch.bfloat16)
    assert not nf4_kernel.applies(_quantized(16, 64, quant_type="fp4"), torch.bfloat16)
    assert not nf4_kernel.applies(_quantized(16, 64), torch.float32)
    assert not nf4_kernel.applies(_quantized(16, 64, dtype=torch.float16), torch.bfloat16)
    assert not nf4_kernel.applies(_quantized(16, 64, storage=torch.bfloat16), torch.bfloat16)
    param = _quantized(16, 64)
    strided = torch.nn.Parameter(torch.cat([param.data, param.data], dim=1)[:, :1], requires_grad=False)
    strided.quant_state = param.quant_state
    assert torch.equal(strided.data, param.data) and not nf4_kernel.applies(strided, torch.bfloat16)
    assert nf4_kernel.applies(param, torch.bfloat16)  # the verdict is kept for this weight, and for no other
    param.quant_state.state2.absmax = param.quant_state.state2.absmax.double()
    assert not nf4_kernel.applies(param, torch.bfloat16)
    param.quant_state.state2.absmax = param.quant_state.state2.absmax.float()
    assert nf4_kernel.applies(param, torch.bfloat16)
    param.quant_state.quant_type = "fp4"  # a field of the same state object
    assert not nf4_kernel.applies(param, torch.bfloat16)
    param.quant_state.quant_type = "nf4"
    assert nf4_kernel.applies(param, torch.bfloat16)
    param.data = param.data.view(torch.int8)  # the same storage, another dtype
    assert not nf4_kernel.applies(param, torch.bfloat16)
    param.data = param.data.view(torch.uint8)
    assert nf4_kernel.applies(param, torch.bfloat16)
    pointer, half = param.data_ptr(), param.data.shape[0] // 2
    param.data = param.data.as_strided((half, 1), (2, 1))  # the same storage and pointer, every other byte
    assert param.data_ptr() == pointer and not nf4_kernel.applies(param, torch.bfloat16)
    assert not nf4_kernel.applies(torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False), torch.bfloat16)
    monkeypatch.setattr(fast_path, "NF4_KERNEL_DEVICES", set())
    assert not nf4_kernel.applies(_quantized(16, 64), torch.bfloat16)


def test_a_weights_layout_is_checked_once_while_nothing_it_reads_changes(monkeypatch):
    """The layout's checks (host time on every 4-bit layer's forward and backward) run once per weight; moving the
    weight's storage re-runs them."""
    checks = []
    check = nf4_kernel._layout_applies
    monkeypatch.setattr(nf4_kernel, "_layout_applies", lambda *a: (checks.append(1), check(*a))[1])
    param, other = _quantized(16, 64), _quantized(16, 64)
    assert all(nf4_kernel.applies(param, torch.bfloat16) for _ in range(5)) and len(checks) == 1
    assert nf4_kernel.applies(other, torch.bfloat16) and len(checks) == 2
    assert not nf4_kernel.applies(param, torch.float32) and len(checks) == 3
    param.data = param.data.clone()
    assert nf4_kernel.applies(param, torch.bfloat16) and len(checks) == 4


@pytest.mark.parametrize("rows", [10, fused_lora.BNB_DEQUANT_MIN_ROWS])
def test_fused_branch_dequantises_an_nf4_base_through_the_kernel(monkeypatch, rows):
    """A frozen NF4 base with a bias inside the fused branch: the kernel gives its weight for x's gradient, and for
    the forward product where bitsandbytes itself would dequantise (a long batch; a short one keeps bitsandbytes'
    own forward); output and gradients are the eager formula's with bitsandbytes' values."""
    bnb = pytest.importorskip("bitsandbytes")
    calls = []
    dequantize = nf4_kernel.dequantize_nf4
    monkeypatch.setattr(nf4_kernel, "dequantize_nf4", lambda *a: (calls.append(1), dequantize(*a))[1])
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    base = base.to(DEVICE).requires_grad_(False)
    weight = _bitsandbytes_arithmetic(base.weight, torch.float32)
    leaves = [torch.randn(rows, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE),
              torch.randn(32, 3, device=DEVICE)]
    fused_in = [t.clone().requires_grad_() for t in leaves]
    eager_in = [t.clone().requires_grad_() for t in leaves]
    fused = fused_lora.lora_branch(fused_in[0], None, fused_in[1], fused_in[2], 0.0, 1.7, base=base)
    assert len(calls) == (rows >= fused_lora.BNB_DEQUANT_MIN_ROWS)
    x, a, b = eager_in
    eager = x @ weight.t() + base.bias + 1.7 * (x @ a.t()) @ b.t()
    close = lambda f, e, what: torch.testing.assert_close(  # noqa: E731 - float32 sums in another order
        f, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"{what}: {m}")
    close(fused, eager, "output")
    weights = torch.randn_like(eager)
    (fused * weights).sum().backward()
    (eager * weights).sum().backward()
    assert len(calls) == 1 + (rows >= fused_lora.BNB_DEQUANT_MIN_ROWS)
    for name, f, e in zip(("x", "A", "B"), fused_in, eager_in):
        close(f.grad, e.grad, f"gradient of {name}")


def test_the_fused_branch_reads_an_nf4_weight_past_its_torch_function(monkeypatch):
    """bitsandbytes' Params4bit runs a Python __torch_function__ on every read of its dtype, shape, strides, data
    pointer or `.data` (3-5 us each, some 7,000 a step on an 8B QLoRA run with checkpointing, where the host bounds
    the step): once a weight's layout is known, the fused branch's forward and backward through the kernel make
    none."""
    bnb = pytest.importorskip("bitsandbytes")
    dispatched = []
    torch_function = bnb.nn.Params4bit.__torch_function__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        dispatched.append(getattr(func, "__name__", func))
        return torch_function(cls, func, types, args, kwargs)

    monkeypatch.setattr(bnb.nn.Params4bit, "__torch_function__", classmethod(counting))
    base = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    base = base.to(DEVICE).requires_grad_(False)
    x = torch.randn(fused_lora.BNB_DEQUANT_MIN_ROWS, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(32, 3, device=DEVICE, requires_grad=True)
    for _ in range(2):  # the first call learns the layout (its checks read the weight); the second is checked
        dispatched.clear()
        assert fused_lora._owns_base(base, x)
        out = fused_lora.lora_branch(x, None, a, b, 0.0, 1.0, base=base)
        forward = list(dispatched)
        out.sum().backward()
    assert forward == [] and dispatched == []  # the second call's forward, then its backward
    assert torch.isfinite(x.grad).all()


def test_without_triton_a_4bit_base_goes_through_bitsandbytes(monkeypatch):
    """triton is not everywhere (the kernel's module imports it): where it is missing, the fused branch never
    imports the kernel and bitsandbytes dequantises."""
    import sys

    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(fast_path, "_TRITON", False)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "peftctl.train.nf4_kernel")
    monkeypatch.delattr(sys.modules["peftctl.train"], "nf4_kernel")  # `from peftctl.train import` reads it first
    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")
    x = torch.randn(fused_lora.BNB_DEQUANT_MIN_ROWS, 64, requires_grad=True)
    out = fused_lora.lora_branch(x, None, torch.randn(3, 64), torch.randn(32, 3), 0.0, 1.0, base=base)
    out.sum().backward()
    assert x.grad is not None and "peftctl.train.nf4_kernel" not in sys.modules


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_loaded_in_4bit_has_weights_the_kernel_takes(tiny_model, write_recipe, dtype):
    """The layout transformers' 4-bit loading writes (through peftctl's load_model, NF4, double quantisation,
    compute dtype = model dtype) is one the kernel takes, with bitsandbytes' values: the fast path is not refused
    in the runs it is for."""
    from peftctl.model import load_model
    from peftctl.recipe.loader import load_recipe

    recipe = write_recipe(tiny_model("llama"), model={"dtype": dtype},
                          quantization={"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": dtype})
    model = load_model(load_recipe(str(recipe)).recipe, torch.device(DEVICE))
    weights = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(weights) == 7 * model.config.num_hidden_layers
    for weight in weights:
        assert nf4_kernel.applies(weight, getattr(torch, dtype))
        assert torch.equal(nf4_kernel.dequantize_nf4(weight, getattr(torch, dtype)),
                           _bitsandbytes_arithmetic(weight, getattr(torch, dtype)))
