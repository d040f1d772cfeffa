"""The decoder layer with its residual sums inside the norms (peftctl/train/residual_norm.py) computes what the
stock layer computes: the same outputs, the same gradients, under activation checkpointing too, and the stock
forward wherever the routing does not apply.

On the GPU the kernels are liger's (tests/test_gpu.py compares them with the stock layer). Here a torch version of
the same two kernels stands in, so what is tested is the routing: which tensors go where, which gradients meet."""

from __future__ import annotations

import copy

import pytest
import torch

from peftctl import activation_checkpointing
from peftctl.train import residual_norm
from peftctl.train.residual_norm import fuse_residual_norms


class TorchKernels:
    """liger's fused add-RMSNorm in torch (Llama's casting, no offset), counting its calls."""

    calls = {"forward": 0, "backward": 0}

    @classmethod
    def forward(cls, x, residual, weight, eps):
        cls.calls["forward"] += 1
        s = x if residual is None else x + residual
        return cls._norm(s, weight, eps), s, None, eps

    @staticmethod
    def _norm(s, weight, eps):  # LlamaRMSNorm.forward's operations, in its order
        s32 = s.to(torch.float32)
        return weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)

    @classmethod
    def backward(cls, grad_y, grad_s, s, weight, rstd, eps, in_place, needs_weight):
        cls.calls["backward"] += 1
        with torch.enable_grad():
            s_, w_ = s.detach().requires_grad_(), weight.detach().requires_grad_()
            grad_x, grad_w = torch.autograd.grad(cls._norm(s_, w_, eps), (s_, w_), grad_y)
        return grad_x + grad_s, (grad_w if needs_weight else None)


def _llama(layers=3, model_type="llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1, so a norm weight applied at the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_routed_layers_give_the_stock_layers_outputs_and_gradients(checkpointing):
    stock = _llama()
    fused = copy.deepcopy(stock)
    TorchKernels.calls.update(forward=0, backward=0)
    assert fuse_residual_norms(fused, torch.device("cpu"), kernels=TorchKernels) == 3
    for model in (stock, fused):
        if checkpointing:  # as the loop checkpoints a run's layers
            activation_checkpointing.enable(model, reentrant=checkpointing == "reentrant")
        model.train()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits, grads = _loss_and_grads(stock, ids)
    fused_logits, fused_grads = _loss_and_grads(fused, ids)
    # the forward is the same operations on the same values: bit for bit
    assert torch.equal(fused_logits, logits)
    forwards = 2 * 3 * (2 if checkpointing else 1)  # two norms a layer, run again when recomputed
    assert TorchKernels.calls == {"forward": forwards, "backward": 2 * 3}
    # every parameter's gradient, the norms' weights included; only the order of two sums differs
    assert fused_grads.keys() == grads.keys() and len(grads) == len(list(stock.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


def test_with_frozen_norms_and_a_lora_adapter_the_adapter_gradients_match():
    from peft import LoraConfig, get_peft_model

    stock = _llama()
    fused = copy.deepcopy(stock)
    fuse_residual_norms(fused, torch.device("cpu"), kernels=TorchKernels)  # before the adapter, as the loop
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    torch.manual_seed(3)
    stock = get_peft_model(stock, config)
    torch.manual_seed(3)
    fused = get_peft_model(fused, config)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    logits, grads = _loss_and_grads(stock, ids)
    fused_logits, fused_grads = _loss_and_grads(fused, ids)
    assert torch.equal(fused_logits, logits)
    assert sorted(grads) == sorted(fused_grads) and all("lora_" in n for n in grads) and len(grads) == 3 * 3 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


def test_a_call_the_routing_does_not_cover_runs_the_stock_forward():
    model = _llama(layers=1)
    fuse_residual_norms(model, torch.device("cpu"), kernels=TorchKernels)
    layer = model.model.layers[0]
    hidden = torch.randn(1, 5, 32)
    position = model.model.rotary_emb(hidden, torch.arange(5)[None])
    TorchKernels.calls.update(forward=0, backward=0)
    routed = layer(hidden, position_embeddings=position)
    assert TorchKernels.calls["forward"] == 2
    positional = layer(hidden, None, position_embeddings=position)  # attention_mask positionally: stock forward
    assert TorchKernels.calls["forward"] == 2
    torch.testing.assert_close(positional, routed)
    layer.post_attention_layernorm = torch.nn.LayerNorm(32)  # a norm the kernels do not compute
    layer(hidden, position_embeddings=position)
    assert TorchKernels.calls["forward"] == 2


def test_what_is_not_routed():
    cpu = torch.device("cpu")
    assert fuse_residual_norms(_llama(), cpu) == 0  # no CUDA: liger's kernels are not there
    assert fuse_residual_norms(_llama(model_type="phi3"), cpu, kernels=TorchKernels) == 0  # residual dropout
    model = _llama()
    model.model.layers[0].register_forward_hook(lambda *a: None)  # somebody's hook on the layer
    model.model.layers[1].input_layernorm.register_forward_pre_hook(lambda *a: None)
    assert fuse_residual_norms(model, cpu, kernels=TorchKernels) == 1
    assert [hasattr(layer, "peftctl_stock_class") for layer in model.model.layers] == [False, False, True]
    assert fuse_residual_norms(model, cpu, kernels=TorchKernels) == 0  # routed once only


def test_liger_norms_are_recognised_by_their_patched_forward():
    """train/kernels.py patches liger's RMSNorm onto the instances; the routing takes only Llama's casting with no
    offset, which is what the kernels compute."""
    norm = _llama(layers=1).model.layers[0].input_layernorm

    def forward(self, x):
        return x

    forward.__qualname__, forward.__module__ = "LigerRMSNorm.forward", "liger_kernel.transformers.rms_norm"
    norm.forward = forward.__get__(norm)
    norm.offset, norm.casting_mode = 0.0, "llama"
    assert residual_norm._llama_rms_norm(norm)
    norm.casting_mode = "gemma"
    assert not residual_norm._llama_rms_norm(norm)
    norm.casting_mode, norm.offset = "llama", 1.0
    assert not residual_norm._llama_rms_norm(norm)
    norm.offset, norm.forward = 0.0, (lambda x: x)  # some other patch
    assert not residual_norm._llama_rms_norm(norm)
