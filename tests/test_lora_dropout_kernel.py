"""LoRA's dropout kernel (peftctl/train/lora_dropout_kernel.py, routed by peftctl/train/fused_lora.py): the mask
drawn inside the LoRA-A product is the one the backward pass uses, it drops p of the inputs, it follows torch's
generator (seeds, activation checkpointing), and the branch keeps x itself rather than a dropped copy and a mask.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
first imported); on a GPU box they run compiled. Shapes stay tiny: the interpreter runs each program in Python."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

from peftctl import fast_path  # noqa: E402
from peftctl.train import fused_lora  # noqa: E402
from peftctl.train.fused_lora import lora_branch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)


@pytest.fixture(autouse=True)
def kernel_here(monkeypatch):
    """The kernel's device rule admits this test's device (the CPU: through the interpreter)."""
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", {"cuda", DEVICE})


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many branches went through the kernel."""
    calls = []
    forward = fused_lora._KernelDropout.forward
    monkeypatch.setattr(fused_lora._KernelDropout, "forward", lambda *a: (calls.append(1), forward(*a))[1])
    return calls


def _kernel_mask(x, p, seed):
    """The mask the kernel draws for x (tokens x in) under torch.manual_seed(seed): with A = B = identity and
    result 0 the branch's output is the dropped input itself, so kept = nonzero (x has no zeros)."""
    width = x.shape[-1]
    eye = torch.eye(width, device=x.device)
    torch.manual_seed(seed)
    out = lora_branch(x.detach(), torch.zeros_like(x), eye, eye, p, 1.0)
    return out != 0, out


def _inputs(dtype, tokens=37, width_in=40, width_out=24, r=8):
    """Odd sizes: none is a multiple of a block, so every edge mask of the kernels is exercised."""
    torch.manual_seed(0)
    x = (torch.rand(tokens, width_in, device=DEVICE) + 0.5).to(dtype)  # no zero inputs: zero output = dropped
    result = torch.randn(tokens, width_out, device=DEVICE).to(dtype)
    a = torch.randn(r, width_in, device=DEVICE)  # float32 adapter weights, as peft keeps them
    b = torch.randn(width_out, r, device=DEVICE)
    return x, result, a, b


@pytest.mark.parametrize("dtype, r", [(torch.float32, 8), (torch.bfloat16, 8), (torch.float16, 8),
                                      (torch.bfloat16, 256), (torch.float32, 256)],
                         ids=["fp32-r8", "bf16-r8", "fp16-r8", "bf16-r256", "fp32-r256"])
def test_forward_mask_is_the_backward_mask_and_gradients_follow_the_formula(dtype, r, kernel_calls):
    """r 8 and 256: the smallest tile of the rank and the widest r the kernel takes."""
    p, scaling = 0.3, 1.5
    x, result, a, b = _inputs(dtype, r=r)
    kept, dropped = _kernel_mask(x, p, seed=7)
    # the kept values are x / (1-p), rounded to x's dtype (within one bf16 step: the interpreter rounds to zero)
    want = (x.float() * (1 / (1 - p))).to(dtype)[kept]
    step = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 0)
    torch.testing.assert_close(dropped[kept], want, rtol=step, atol=0)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.manual_seed(7)  # the same seed: the same mask, now with real A and B
    fused = lora_branch(leaves[0], result, leaves[1], leaves[2], p, scaling)
    assert len(kernel_calls) == 2
    weights = torch.randn(fused.shape, device=DEVICE)  # a loss whose gradient is not uniform
    (fused.float() * weights).sum().backward()
    # x's gradient is zero exactly where the forward dropped
    assert torch.equal(leaves[0].grad != 0, kept)

    eager_in = [t.detach().float().requires_grad_() for t in (x, a, b)]
    ex, ea, eb = eager_in
    eager = result.float() + ((ex * kept / (1 - p)) @ ea.t()) @ eb.t() * scaling
    (eager * weights).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    scale = lambda t: t / t.abs().max()  # noqa: E731 - bf16: compare relative to the tensor's size
    torch.testing.assert_close(scale(fused.detach().float()), scale(eager.detach()), **tol)
    for name, f, e in zip(("x", "A", "B"), leaves, eager_in):
        torch.testing.assert_close(scale(f.grad.float()), scale(e.grad), **tol, msg=f"gradient of {name}")
        assert f.grad.dtype == f.dtype  # x's gradient in x's dtype; A's and B's in the adapter's float32


def test_split_sums_give_the_formula(kernel_calls):
    """Enough columns that the forward splits them, enough tokens that grad_A's sum splits them (the sizes, like
    the others here, no multiple of a block): the mask read back from x's gradient (its kernel does not split)
    gives the output and A's gradient of the explicit formula."""
    from peftctl.train.lora_dropout_kernel import _blocks, _split

    tokens, width_in, p = 460, 232, 0.2
    blocks = _blocks(4, torch.float32)
    assert _split(width_in, blocks["BLOCK_K"], -(-tokens // blocks["BLOCK_M"]))[0] > 1
    assert _split(tokens, blocks["BLOCK_M"], -(-width_in // blocks["BLOCK_K"]))[0] > 1
    x, result, a, b = _inputs(torch.float32, tokens=tokens, width_in=width_in, width_out=8, r=4)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    out = lora_branch(leaves[0], result, leaves[1], leaves[2], p, 1.0)
    weights = torch.randn(out.shape, device=DEVICE)
    (out * weights).sum().backward()
    kept = leaves[0].grad != 0
    ex, ea, eb = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    eager = result + ((ex * kept / (1 - p)) @ ea.t()) @ eb.t()
    (eager * weights).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(leaves[1].grad, ea.grad, rtol=1e-4, atol=1e-3)
    assert abs((1 - kept.float().mean().item()) - p) < 0.02


def test_drop_fraction_is_p_and_the_mask_follows_the_seed():
    p = 0.3
    x = torch.rand(64, 64, device=DEVICE) + 0.5
    kept, _ = _kernel_mask(x, p, seed=1)
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma: 0.036
    assert torch.equal(_kernel_mask(x, p, seed=1)[0], kept)  # same seed, same mask
    other = _kernel_mask(x, p, seed=2)[0]
    assert (other != kept).float().mean().item() > 0.2  # independent masks differ in 2p(1-p) = 42% of places
    # every row draws its own mask (the offsets count rows as well as columns)...
    assert sum(torch.equal(kept[0], kept[i]) for i in range(1, kept.shape[0])) == 0
    # ...and so does each of the four columns one Philox call serves
    for lane in (1, 2, 3):
        assert (kept[:, 0::4] != kept[:, lane::4]).float().mean().item() > 0.2, lane


def test_checkpoint_recompute_draws_the_same_mask(kernel_calls):
    x, result, a, b = _inputs(torch.float32, tokens=19, width_in=24, width_out=10, r=4)
    leaves = [t.requires_grad_() for t in (x, a, b)]

    def run(use_checkpoint):
        for t in leaves:
            t.grad = None
        torch.manual_seed(3)
        fn = lambda x_: lora_branch(x_, result, a, b, 0.5, 1.0)  # noqa: E731
        out = checkpoint(fn, x, use_reentrant=False) if use_checkpoint else fn(x)
        (out ** 2).sum().backward()
        return out.detach(), [t.grad.clone() for t in leaves]

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    assert len(kernel_calls) == 3  # plain, checkpointed forward, its recomputation
    torch.testing.assert_close(ckpt_out, plain_out)
    for g_ckpt, g_plain in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(g_ckpt, g_plain)  # a different mask would change which entries are zero


def test_branch_keeps_x_itself_and_no_dropped_copy_or_mask(kernel_calls):
    """What autograd keeps: x's own storage (which q, k and v share), h and a seed -- nothing else as wide as x."""
    x, result, a, b = _inputs(torch.bfloat16, tokens=32, width_in=48)
    x.requires_grad_()
    a.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        lora_branch(x, result, a, b, 0.1, 1.0)
    assert len(kernel_calls) == 1
    wide = [t for t in saved if t.numel() >= x.numel()]
    assert len(wide) == 1 and wide[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert sorted(t.numel() for t in saved if t.numel() < x.numel()) == sorted([1, 32 * 8, a.numel(), b.numel()])


def test_routing_only_where_the_rule_says(kernel_calls):
    x, result, a, b = _inputs(torch.float32, tokens=8, width_in=16, width_out=8, r=4)
    lora_branch(x, result, a, b, 0.0, 1.0)  # p = 0: the plain product
    lora_branch(x.double(), result.double(), a.double(), b.double(), 0.2, 1.0)  # float64: not a kernel dtype
    lora_branch(x, result, torch.randn(257, 16, device=DEVICE), torch.randn(8, 257, device=DEVICE), 0.2, 1.0)
    assert kernel_calls == []
    lora_branch(x, result, a, b, 0.2, 1.0)
    assert len(kernel_calls) == 1


def test_cpu_keeps_today_s_branch_without_the_interpreter_rule(monkeypatch, kernel_calls):
    """The shipped rule: CUDA only. A CPU call goes through torch's dropout, bit for bit today's branch."""
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", {"cuda"})
    x, result, a, b = _inputs(torch.float32, tokens=6, width_in=16, width_out=8, r=4)
    x = x.cpu()
    torch.manual_seed(4)
    out = lora_branch(x, result.cpu(), a.cpu(), b.cpu(), 0.4, 1.0)
    torch.manual_seed(4)
    mask = torch.native_dropout(x, 0.4, True)[1]
    expected = result.cpu() + ((x * mask / 0.6) @ a.cpu().t()) @ b.cpu().t()
    assert kernel_calls == []
    torch.testing.assert_close(out, expected)


def test_the_rule(monkeypatch):
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", {"cuda"})  # as shipped
    rule = fast_path.lora_dropout_kernel_applies
    ok = dict(device_type="cuda", dropout=0.05, dtype="bfloat16", r=16, elements=8192 * 14336, triton=True)
    assert rule(**ok)
    assert rule(**{**ok, "dtype": "float16"}) and rule(**{**ok, "dtype": "float32"}) and rule(**{**ok, "r": 256})
    for change in ({"device_type": "cpu"}, {"dropout": 0.0}, {"dtype": "float64"}, {"r": 257}, {"triton": False},
                   {"elements": 2 ** 31}, {"elements": 0}):
        assert not rule(**{**ok, **change}), change


def test_fused_model_trains_through_the_kernel(tiny_model, kernel_calls):
    """A routed peft model in training: every adapted layer takes the kernel, the loss's gradient reaches every
    adapter weight; in eval (p = 0) no layer does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftctl.train.fused_lora import dropout_kernel_layers, fuse_lora_layers

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                            init_lora_weights=False))
    routed = fuse_lora_layers(model)
    # what run.json's fast_path names: every routed layer here, none where the rule is CUDA's alone
    assert dropout_kernel_layers(model, DEVICE, None, 12) == routed
    assert dropout_kernel_layers(model, DEVICE, torch.bfloat16, 12) == 0  # float32 activations: peft's forward
    ids = torch.randint(0, model.config.vocab_size, (1, 12), device=DEVICE)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(kernel_calls) == routed > 0
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(kernel_calls) == routed


def test_a_strided_input_gives_what_its_contiguous_copy_gives(kernel_calls):
    """x may reach the branch as a strided view (the kernels read it through its strides, never copying it)."""
    x, result, a, b = _inputs(torch.float32, tokens=20, width_in=24, width_out=8, r=4)
    strided = x.t().contiguous().t()  # the same values, column-major
    grads = []
    for inp in (x, strided):
        leaf = inp.detach().clone() if inp is x else inp.detach().t().clone().t()
        leaf.requires_grad_()
        torch.manual_seed(9)
        out = lora_branch(leaf, result, a, b, 0.4, 1.0)
        (out ** 2).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert not strided.is_contiguous() and len(kernel_calls) == 2
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


COMPILE_FOR_SM90 = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peftctl.train import lora_dropout_kernel as k

out = []
names = {"forward": k._forward_kernel, "grad_x": k._grad_input_kernel, "grad_a": k._grad_weight_kernel}
configs = [(torch.bfloat16, 16, None, None), (torch.float32, 256, None, None)]
configs += [(torch.bfloat16, 16, name, dict(zip(("BLOCK_M", "BLOCK_K", "num_warps", "num_stages"), tiles)))
            for (name, _), tiles in k.HOPPER_TILES.items()]
for dtype, r, only, tiles in configs:
    t = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    blocks = k._blocks(r, dtype, tiles)
    options = {key: blocks.pop(key) for key in ("num_stages", "num_warps") if key in blocks}
    consts = dict(blocks, IEEE=dtype == torch.float32, UPCAST=False)
    kernels = {k._forward_kernel: [f"*{t}", f"*{t}", "*fp32", "*i64"] + ["i32"] * 6 + ["fp32"] * 2,
               k._grad_input_kernel: [f"*{t}"] * 3 + ["*i64"] + ["i32"] * 3 + ["fp32"] * 2,
               k._grad_weight_kernel: [f"*{t}", f"*{t}", "*fp32", "*i64"] + ["i32"] * 6 + ["fp32"] * 2}
    for fn, types in kernels.items():
        if only and fn is not names[only]:
            continue
        signature = dict(zip(fn.arg_names, types)) | {n: "constexpr" for n in consts}
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        out.append([fn.fn.__name__, t, r, tiles is not None, len(compiled.asm["cubin"]), compiled.metadata.shared])
print(json.dumps(out))
"""


@pytest.mark.slow  # about 25 s: a fresh process and twelve compilations
def test_the_kernels_compile_for_a_gpu(tmp_path):
    """Triton compiles the kernels for an H100/H200 (sm_90) here, without a GPU, down to the cubin (the interpreter
    tests check what they compute; this that they compile): bf16 at r 16, float32 at r 256, and every kernel's
    shared memory within the 64 KiB any card since Turing has, the H200's tiles (HOPPER_TILES) too."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode and "ptxas" in done.stderr.lower() and "not found" in done.stderr.lower():
        pytest.skip("this triton has no ptxas to compile with")
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(compiled) == 12
    for name, dtype, r, hopper_tiles, cubin_bytes, shared in compiled:
        assert cubin_bytes > 0 and shared <= 64 * 1024, (name, dtype, r, hopper_tiles, shared)


def test_a_model_fused_without_the_kernel_keeps_torch_s_dropout(tiny_model, kernel_calls):
    """fuse_lora_layers(dropout_kernel=False) -- what the loop does unless the memory plan needs the kernel --
    trains through torch's dropout on every layer, and run.json's count of kernel layers is zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftctl.train.fused_lora import dropout_kernel_layers, fuse_lora_layers

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                            init_lora_weights=False))
    assert fuse_lora_layers(model, dropout_kernel=False) > 0
    assert dropout_kernel_layers(model, DEVICE, None, 12) == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 12), device=DEVICE)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert kernel_calls == []


def test_other_tiles_and_splits_give_the_shipped_tiles_results(monkeypatch):
    """scripts/tune_lora_dropout_kernel.py tries other tiles and split targets: they are launched as asked, and give
    the shipped tiles' results (the mask depends on the seed and each element's position, not on the tiles)."""
    from peftctl.train import lora_dropout_kernel as kernel

    launched = []
    for name in ("_forward_kernel", "_grad_input_kernel", "_grad_weight_kernel"):
        real = getattr(kernel, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                def launch(*args, **kwargs):
                    launched.append((name, tuple(grid), kwargs["BLOCK_M"], kwargs["BLOCK_K"]))
                    return real[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(kernel, name, Spy())
    tokens, width, r, p = 300, 200, 4, 0.2
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE)
    a, grad_h = torch.randn(r, width, device=DEVICE), torch.randn(tokens, r, device=DEVICE)
    seed = kernel.draw_seed(x.device)

    def all_three(**options):
        grad_x_options = {k: v for k, v in options.items() if k == "tiles"}
        return (kernel.dropout_a_forward(x, a, seed, p, **options),
                kernel.dropout_a_grad_input(grad_h, a, seed, p, torch.float32, **grad_x_options),
                kernel.dropout_a_grad_weight(grad_h, x, seed, p, **options))

    shipped = all_three()
    default_launches = launched[:]
    launched.clear()
    other = all_three(tiles={"BLOCK_M": 16, "BLOCK_K": 16}, target_programs=64)
    assert [(n, m, k) for n, _, m, k in launched] == [(n, 16, 16) for n, *_ in default_launches]
    assert [(n, m, k) for n, _, m, k in default_launches] == [
        ("_forward_kernel", 64, 32), ("_grad_input_kernel", 64, 32), ("_grad_weight_kernel", 64, 32)]
    assert all(g != d for (_, g, *_), (_, d, *_) in zip(launched, default_launches, strict=True))  # other grids
    for got, want in zip(other, shipped, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # only the fp32 sums' order differs


def test_hopper_tiles_only_where_they_were_measured(monkeypatch):
    """The tiles tuned on an H200 go to 16-bit inputs at r <= 16 on a Hopper GPU, per kernel and by the input's width;
    a caller's own tiles, float32, a wider r and any other GPU keep _blocks' tiles."""
    from peftctl.train import lora_dropout_kernel as kernel

    bf16 = torch.empty(4, 4, dtype=torch.bfloat16)
    assert not kernel.hopper(bf16.device)  # the CPU
    shipped = kernel._config("forward", bf16, 16, 4096, None, None)
    assert shipped == (kernel._blocks(16, torch.bfloat16), kernel._TARGET_PROGRAMS)
    monkeypatch.setattr(kernel, "hopper", lambda device: True)
    for name in ("forward", "grad_x", "grad_a"):
        for width, wide in ((4096, False), (14336, True)):
            m, k, warps, stages, target = kernel.HOPPER_TILES[name, wide]
            blocks, got_target = kernel._config(name, bf16, 16, width, None, None)
            assert (blocks["BLOCK_M"], blocks["BLOCK_K"], blocks["num_warps"], blocks["num_stages"]) == (
                m, k, warps, stages)
            assert got_target == (target or kernel._TARGET_PROGRAMS)
            assert kernel._config(name, bf16, 16, width, None, 64)[1] == 64  # a caller's target wins
    assert kernel.HOPPER_TILES["forward", False] != kernel.HOPPER_TILES["forward", True]
    assert kernel._config("forward", bf16, 16, 4096, {"BLOCK_M": 16}, None)[0] == kernel._blocks(
        16, torch.bfloat16, {"BLOCK_M": 16})
    assert kernel._config("forward", bf16.float(), 16, 4096, None, None)[0] == kernel._blocks(16, torch.float32)
    assert kernel._config("forward", bf16, 32, 4096, None, None)[0] == kernel._blocks(32, torch.bfloat16)


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
def test_hopper_tiles_give_the_shipped_tiles_results(monkeypatch, wide):
    """Launched with the H200's tiles (narrow and wide), the three kernels give what _blocks' tiles give: the same
    mask (x's gradient is zero in the same places) and the same sums up to their order. The wide tiles are tried
    on the same small input, with the width they start from lowered (the interpreter runs each program in
    Python)."""
    from peftctl.train import lora_dropout_kernel as kernel

    tokens, width, r, p = 96, 200, 16, 0.2
    if wide:
        monkeypatch.setattr(kernel, "WIDE", 128)
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE).to(torch.bfloat16)
    a = (torch.randn(r, width, device=DEVICE) / width ** 0.5).to(torch.bfloat16)
    grad_h = torch.randn(tokens, r, device=DEVICE).to(torch.bfloat16)
    seed = kernel.draw_seed(x.device)

    def all_three():
        return (kernel.dropout_a_forward(x, a, seed, p).float(),
                kernel.dropout_a_grad_input(grad_h, a, seed, p, torch.bfloat16).float(),
                kernel.dropout_a_grad_weight(grad_h, x, seed, p))

    shipped = all_three()
    launched = []
    real = kernel._config
    monkeypatch.setattr(kernel, "hopper", lambda device: True)
    monkeypatch.setattr(kernel, "_config", lambda *a: (launched.append(real(*a)[0]["BLOCK_K"]), real(*a))[1])
    tuned = all_three()
    assert launched == [kernel.HOPPER_TILES[name, wide][1] for name in ("forward", "grad_x", "grad_a")]
    assert torch.equal(tuned[1] != 0, shipped[1] != 0)
    for got, want in zip(tuned, shipped, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
