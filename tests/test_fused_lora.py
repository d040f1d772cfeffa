"""The fused LoRA branch (peftctl/train/fused_lora.py) computes what peft's layers compute: the same outputs and
gradients, dropout included, and peft's own forward wherever it does not apply."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from peftctl.train import fused_lora
from peftctl.train.fused_lora import _fused_forward, _owns_base, fuse_lora_layers, lora_branch


def _eager(x, result, a, b, mask, p, scaling):
    dropped = x * mask / (1 - p) if mask is not None else x
    return result + (dropped @ a.t()) @ b.t() * scaling


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_branch_matches_the_eager_formula_for_a_given_mask(p):
    torch.manual_seed(0)
    tokens, width_in, width_out, r, scaling = (2, 5), 12, 7, 3, 1.7
    leaves = [torch.randn(*tokens, width_in, dtype=torch.float64), torch.randn(*tokens, width_out, dtype=torch.float64),
              torch.randn(r, width_in, dtype=torch.float64), torch.randn(width_out, r, dtype=torch.float64)]
    fused_in = [t.clone().requires_grad_() for t in leaves]
    eager_in = [t.clone().requires_grad_() for t in leaves]
    torch.manual_seed(1)
    fused = lora_branch(*fused_in, p, scaling)
    torch.manual_seed(1)  # torch's dropout kernel again, for the mask the fused branch drew
    mask = torch.native_dropout(leaves[0].reshape(-1, width_in), p, True)[1].reshape(*tokens, width_in) if p else None
    eager = _eager(*eager_in, mask, p, scaling)
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(eager)  # a loss whose gradient is not uniform
    (fused * weights).sum().backward()
    (eager * weights).sum().backward()
    for name, f, e in zip(("x", "result", "A", "B"), fused_in, eager_in):
        torch.testing.assert_close(f.grad, e.grad, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def test_output_may_be_modified_in_place_like_peft_s():
    """Falcon adds to a projection's output in place; plain peft allows it, so the fused branch must too, with the
    same gradients as the out-of-place sum."""
    torch.manual_seed(0)
    leaves = [torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64),
              torch.randn(3, 12, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)]
    extra = torch.randn(2, 5, 7, dtype=torch.float64)
    grads = []
    for in_place in (True, False):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = lora_branch(*inputs, 0.0, 1.5)
        out = out.add_(extra) if in_place else out + extra
        (out * out).sum().backward()
        grads.append([t.grad for t in inputs])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_branch_keeps_parameter_dtypes_and_computes_in_the_activations_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    result = torch.randn(4, 8, dtype=torch.bfloat16)
    a = torch.randn(2, 16, requires_grad=True)
    b = torch.randn(8, 2, requires_grad=True)
    out = lora_branch(x, result, a, b, 0.0, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    expected = _eager(x.detach().float(), result.float(), a.detach(), b.detach(), None, 0.0, 2.0)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_dropout_uses_one_mask_for_forward_and_backward():
    # A = B = identity: the output is the dropped input itself, so the forward's mask is where the output is zero;
    # x's gradient (ones through the identity) is zero exactly where the backward masked. The masks must be equal
    # -- compared as masks, not as float sums whose rounding differs from CPU to CPU.
    torch.manual_seed(1)
    width, p = 2048, 0.25
    x = (torch.rand(1, width) + 0.5).requires_grad_(True)  # no zero inputs: a zero output means dropped
    a = torch.eye(width, requires_grad=True)
    b = torch.eye(width, requires_grad=True)
    out = lora_branch(x, torch.zeros(1, width), a, b, p, 1.0)
    out.sum().backward()
    kept_forward, kept_backward = out.detach() != 0, x.grad != 0
    assert torch.equal(kept_forward, kept_backward)
    assert abs(1 - kept_forward.float().mean().item() - p) < 0.05  # about p of the inputs dropped
    assert set(x.grad.unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
    torch.testing.assert_close(out.detach()[kept_forward], x.detach()[kept_forward] / (1 - p))


def test_checkpoint_recompute_draws_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(3, 64, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(10, 4, requires_grad=True)
    result = torch.zeros(3, 10)

    def run(use_checkpoint):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(3)
        fn = lambda x_: lora_branch(x_, result, a, b, 0.5, 1.0)  # noqa: E731
        out = checkpoint(fn, x, use_reentrant=False) if use_checkpoint else fn(x)
        (out ** 2).sum().backward()
        return out.detach(), [t.grad.clone() for t in (x, a, b)]

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_out, plain_out)
    for g_ckpt, g_plain in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(g_ckpt, g_plain)


def _linear_4bit(width_in, width_out, dtype=torch.float32):
    """A bitsandbytes NF4 layer on the CPU (its CPU backend), frozen, computing in `dtype`."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(width_in, width_out, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(width_out, width_in) * 0.1, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def _frozen_linear(width_in, width_out, dtype):
    return torch.nn.Linear(width_in, width_out, dtype=dtype).requires_grad_(False)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_branch_that_computes_the_base_matches_the_eager_formula(kind, p):
    """With the base computed inside the function, x's gradient carries the base's part (grad @ W, W dequantised
    for 4-bit) as well as the branch's, and the output is the base's plus the branch."""
    torch.manual_seed(0)
    dtype = torch.float64 if kind == "linear" else torch.float32
    base = _frozen_linear(12, 7, dtype) if kind == "linear" else _linear_4bit(64, 32)
    width_in, width_out = base.in_features, base.out_features
    assert _owns_base(base, torch.zeros(1, width_in, dtype=dtype))
    if kind == "linear":
        weight, bias = base.weight, base.bias
    else:
        import bitsandbytes.functional as bnb_functional

        weight, bias = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state), None
    leaves = [torch.randn(2, 5, width_in, dtype=dtype), torch.randn(3, width_in, dtype=dtype),
              torch.randn(width_out, 3, dtype=dtype)]
    fused_in = [t.clone().requires_grad_() for t in leaves]
    eager_in = [t.clone().requires_grad_() for t in leaves]
    torch.manual_seed(1)
    fused = lora_branch(fused_in[0], None, fused_in[1], fused_in[2], p, 1.7, base=base)
    torch.manual_seed(1)
    mask = torch.native_dropout(leaves[0].reshape(-1, width_in), p, True)[1].reshape(2, 5, width_in) if p else None
    x, a, b = eager_in
    eager = _eager(x, torch.nn.functional.linear(x, weight, bias), a, b, mask, p, 1.7)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, eager, **tol)
    weights = torch.randn_like(eager)
    (fused * weights).sum().backward()
    (eager * weights).sum().backward()
    for name, f, e in zip(("x", "A", "B"), fused_in, eager_in):
        torch.testing.assert_close(f.grad, e.grad, **tol, msg=f"gradient of {name}")


def test_branch_that_computes_the_base_adds_into_the_base_output_buffer():
    """No copy of the base's output: the result is the very tensor the base layer returned."""
    base = _frozen_linear(16, 8, torch.float32)
    returned = []
    forward = base.forward
    base.forward = lambda t: (returned.append(forward(t)), returned[-1])[1]  # not a hook: _owns_base still says yes
    x = torch.randn(3, 16, requires_grad=True)
    out = lora_branch(x, None, torch.randn(2, 16), torch.randn(8, 2), 0.0, 1.0, base=base)
    assert len(returned) == 1 and out.data_ptr() == returned[0].data_ptr()
    out.add_(1.0).sum().backward()  # and the caller may still add to it in place
    assert x.grad is not None


def test_only_frozen_plain_base_layers_are_computed_inside():
    x = torch.zeros(1, 16)
    assert _owns_base(_frozen_linear(16, 8, torch.float32), x)
    assert not _owns_base(torch.nn.Linear(16, 8), x)  # a trained weight: autograd must see it
    trained_bias = _frozen_linear(16, 8, torch.float32)
    trained_bias.bias.requires_grad_(True)
    assert not _owns_base(trained_bias, x)
    hooked = _frozen_linear(16, 8, torch.float32)
    hooked.register_forward_hook(lambda *a: None)
    assert not _owns_base(hooked, x)
    offloaded = _frozen_linear(16, 8, torch.float32)
    from accelerate.hooks import ModelHook, add_hook_to_module

    add_hook_to_module(offloaded, ModelHook())  # accelerate's offload hook: weights moved in around the forward
    assert not _owns_base(offloaded, x)

    class Subclass(torch.nn.Linear):
        pass

    assert not _owns_base(Subclass(16, 8).requires_grad_(False), x)
    nf4 = _linear_4bit(64, 32, dtype=torch.bfloat16)
    assert _owns_base(nf4, torch.zeros(1, 64, dtype=torch.bfloat16))
    assert not _owns_base(nf4, torch.zeros(1, 64))  # bitsandbytes would cast x: its own forward does that


def test_fused_model_computes_every_plain_base_inside(tiny_model, monkeypatch):
    """Every routed layer of a frozen base model takes the path that computes the base (and x's gradient through
    it) inside the function."""
    model = _peft_model(tiny_model, lora_dropout=0.1)
    routed = fuse_lora_layers(model)
    calls = []
    matrix = fused_lora._base_matrix  # read once a layer's backward, where x's gradient goes through the base
    monkeypatch.setattr(fused_lora, "_base_matrix", lambda *a: (calls.append(1), matrix(*a))[1])
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.get_input_embeddings().weight.requires_grad_(True)  # so that the first layer's x needs a gradient too
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == routed > 0


def _peft_model(tiny_model, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(base, config)


def _logits_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_fused_model_matches_peft_outputs_and_gradients(tiny_model):
    model = _peft_model(tiny_model, lora_dropout=0.0)
    fused = copy.deepcopy(model)
    routed = fuse_lora_layers(fused)
    assert routed == sum(1 for n, _ in model.named_modules() if n.endswith("proj") and ".lora_" not in n) > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    logits, grads = _logits_and_grads(model, ids)
    fused_logits, fused_grads = _logits_and_grads(fused, ids)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The adapter still switches off, and peft's merge still works on a routed layer.
    with fused.disable_adapter():
        with model.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)
    fused.merge_adapter()
    torch.testing.assert_close(fused(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_dropout_trains_like_peft_in_expectation_and_is_off_in_eval(tiny_model):
    model = _peft_model(tiny_model, lora_dropout=0.5)
    fused = copy.deepcopy(model)
    fuse_lora_layers(fused)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        fused.train()
        torch.manual_seed(0)
        first = fused(input_ids=ids).logits
        torch.manual_seed(1)
        second = fused(input_ids=ids).logits
    assert not torch.allclose(first, second)  # dropout is drawn in training


def test_dora_and_lora_bias_layers_keep_peft_forward(tiny_model):
    for lora in ({"use_dora": True}, {"lora_bias": True}):
        model = _peft_model(tiny_model, lora_dropout=0.0, **lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    param.normal_()  # zero at initialisation: a fused branch that dropped it would still agree
        fused = copy.deepcopy(model)
        assert fuse_lora_layers(fused) == 0, lora  # not routed: run.json does not claim the fused branch
        for module in fused.modules():  # routed anyway, the forward still falls back to peft's
            if type(module).__name__ == "Linear" and hasattr(module, "lora_A"):
                module.forward = types.MethodType(_fused_forward, module)
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, msg=str(lora))


def test_training_routes_lora_and_not_other_methods(tiny_model, trained):
    lora_run = trained("fused-lora", tiny_model(), method={"dropout": 0.1})
    ia3_run = trained("fused-ia3", tiny_model(), method={"name": "ia3", "_replace": True,
                                                           "targets": ["k_proj", "v_proj", "down_proj"],
                                                           "feedforward_targets": ["down_proj"]})
    lora_kernels = json.loads((lora_run / "run.json").read_text())["fast_path"]["kernels"]
    ia3_kernels = json.loads((ia3_run / "run.json").read_text())["fast_path"]["kernels"]
    assert "fused_lora_branch" in lora_kernels and "fused_lora_branch" not in ia3_kernels
    assert "lora_dropout_kernel" not in lora_kernels  # CUDA only: the CPU keeps torch's dropout


def test_a_kept_matrix_is_dequantised_once_and_changes_no_sum(monkeypatch):
    """quantization.keep_dequantized: the layer's matrix is dequantised on the first call only, then read from the
    layer, forward (a long batch, where the base is F.linear of the matrix) and backward; the sums are those of
    dequantising on every call, and dropping the kept matrix brings the per-call dequantisation back."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    base = _linear_4bit(64, 32)
    calls = []
    dequantize = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: (calls.append(1), dequantize(*a, **k))[1])
    x = torch.randn(fused_lora.BNB_DEQUANT_MIN_ROWS + 3, 64)
    a, b = torch.randn(3, 64), torch.randn(32, 3)

    def step():
        leaf = x.clone().requires_grad_()
        out = lora_branch(leaf, None, a, b, 0.0, 1.7, base=base)
        out.square().sum().backward()
        return out.detach(), leaf.grad

    base.peftctl_keep_dequantized = True
    kept = [step() for _ in range(3)]
    assert len(calls) == 1
    matrix = base._peftctl_dequantized.matrix
    torch.testing.assert_close(matrix, dequantize(base.weight.data, base.weight.quant_state), rtol=0, atol=0)
    assert not any("dequantized" in key for key in base.state_dict())
    calls.clear()
    base.peftctl_keep_dequantized = False
    base.__dict__.pop("_peftctl_dequantized")
    again = step()
    assert len(calls) == 1  # x's gradient dequantises again (the forward went through bitsandbytes' own layer)
    for (out, grad) in kept:  # the same matrix either way: bit for bit
        torch.testing.assert_close(out, again[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, again[1], rtol=0, atol=0)


@pytest.mark.parametrize("weights, compute", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                              (torch.float32, torch.bfloat16)])
def test_a_kept_matrix_leaves_the_forward_as_bitsandbytes_computes_it(weights, compute):
    """bitsandbytes' forward of a long batch dequantises straight into the compute dtype; the kept matrix is made
    as its backward makes it (in the dtype the weight was quantised from, then cast). Where those differ, the
    forward stays bitsandbytes' own: the output is bit for bit what the layer gives, kept matrix or not."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=compute, quant_type="nf4")
    base.weight = bnb.nn.Params4bit((torch.randn(32, 64) * 0.1).to(weights), requires_grad=False, quant_type="nf4")
    base = base.to("cpu")  # quantises
    base.peftctl_keep_dequantized = True
    x = torch.randn(fused_lora.BNB_DEQUANT_MIN_ROWS + 3, 64).to(compute)
    fused_lora._base_matrix(base, compute)  # the backward pass made and kept it first
    assert base._peftctl_dequantized.matrix.dtype == compute
    with torch.no_grad():
        assert torch.equal(fused_lora._base_forward(base, x, compute), base(x))


def test_keep_dequantized_marks_the_fused_4bit_layers_and_drops_their_matrices(tiny_model):
    """Every 4-bit layer the fused branch computes keeps its matrix after a step; none is in the state dict; keep
    False frees them all (the loop does so before the merge and the evaluation)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32, quantization_config=quant,
                                                device_map={"": "cpu"})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    routed = fuse_lora_layers(model)
    keys = set(model.state_dict())
    other = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    other.compute_dtype = torch.bfloat16  # computes in another dtype than the activations': the fused branch won't
    assert fused_lora.keep_dequantized(model, True) == routed - 1 > 0
    assert not getattr(other, "peftctl_keep_dequantized", False)
    other.compute_dtype = torch.float32
    assert fused_lora.keep_dequantized(model, True) == routed
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.get_input_embeddings().weight.requires_grad_(True)  # so that the first layer's x needs a gradient too
    model(input_ids=ids, labels=ids).loss.backward()  # x's gradient reads each adapted layer's matrix
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert all(hasattr(b, "_peftctl_dequantized") for b in bases) and len(bases) == routed
    assert set(model.state_dict()) == keys
    fused_lora.keep_dequantized(model, False)
    assert not any(hasattr(b, "_peftctl_dequantized") or b.peftctl_keep_dequantized for b in bases)


def test_a_qlora_run_that_keeps_its_matrices_trains_the_same_adapter(tiny_model, write_recipe, tmp_path,
                                                                   monkeypatch):
    """quantization.keep_dequantized: true on a CPU run: each adapted layer's weight is dequantised once in the whole
    run (against once a layer and step without), run.json names it, the adapter is bit for bit the one trained
    without it, and the loop drops the matrices when training ends."""
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    calls, marked = [], []
    dequantize = bnb_functional.dequantize_4bit
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: (calls.append(1), dequantize(*a, **k))[1])
    keep = fused_lora.keep_dequantized
    monkeypatch.setattr(fused_lora, "keep_dequantized", lambda model, on: (marked.append((model, on)),
                                                                            keep(model, on))[1])

    def run(kept):
        calls.clear()
        name = f"kept-{kept}"
        path = write_recipe(tiny_model(), name=f"{name}.yaml", out=tmp_path / name,
                            method={"name": "qlora", "targets": "all-linear", "dropout": 0.1, "_replace": True},
                            quantization={"bits": 4, "quant_type": "nf4", "compute_dtype": "float32",
                                          "keep_dequantized": kept},
                            training={"max_steps": 3})
        train(load_recipe(str(path)), TrainOptions(quiet=True))
        kernels = json.loads((tmp_path / name / "run.json").read_text())["fast_path"]["kernels"]
        return len(calls), kernels, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    kept_calls, kept_kernels, kept_weights = run(True)
    model = marked[-1][0]
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    # the first decoder layer's q, k and v get no x gradient (the embedding is frozen): never dequantised there
    assert kept_calls == layers - 3
    assert marked[-1][1] is False and not any(hasattr(m, "_peftctl_dequantized") for m in model.modules())
    plain_calls, plain_kernels, plain_weights = run(False)
    assert plain_calls == 3 * kept_calls  # once a layer and step
    assert "dequantized_4bit_weights_kept" in kept_kernels and "dequantized_4bit_weights_kept" not in plain_kernels
    assert kept_weights.keys() == plain_weights.keys()
    assert all(torch.equal(kept_weights[k], plain_weights[k]) for k in kept_weights)
