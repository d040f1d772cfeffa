"""Activation checkpointing (peftctl/activation_checkpointing.py): the reentrant form where a layer's call allows
it gives the gradients the non-reentrant form and no checkpointing give; a call it would get wrong takes the
non-reentrant form."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from peftctl import activation_checkpointing as ac
from peftctl.activation_checkpointing import NON_REENTRANT, REENTRANT, ReentrantWhereAllowed


def lora_model(folder, form):
    """A tiny llama with LoRA (dropout on: the recomputation must draw the same masks), checkpointed as `form`
    (None: not checkpointed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftctl.model import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if form is not None:
        assert enable_gradient_checkpointing(model, reentrant=form == REENTRANT) == form
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.3, init_lora_weights=False))
    model.train()
    return model


def loss_and_grads(model, ids):
    torch.manual_seed(7)  # the same dropout masks in every model
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_reentrant_form_trains_what_the_others_train(tiny_model):
    folder = tiny_model("llama")
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    results = {}
    for form in (None, NON_REENTRANT, REENTRANT):
        model = lora_model(folder, form)
        results[form] = loss_and_grads(model, ids)
        assert ac.form(model) == form
        taken = ac.forms_taken(model)
        layers = model.config.num_hidden_layers
        if form == REENTRANT:  # every layer's call took it: the layer's input needs a gradient, nothing else does
            assert taken == {REENTRANT: layers, NON_REENTRANT: 0}
        else:
            assert taken == {REENTRANT: 0, NON_REENTRANT: 0}  # no wrapper
    loss, grads = results[None]
    assert len(grads) == 3 * 2 * layers and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for form in (NON_REENTRANT, REENTRANT):
        other_loss, other_grads = results[form]
        assert torch.allclose(other_loss, loss, rtol=1e-5)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            # the same masks and sums: equal up to float32 rounding, far from any wrong or missing gradient
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6)


def scaled(x, *, weight):
    return torch.tanh(x * weight).sum(dim=-1, keepdim=True) * x


@pytest.mark.parametrize("call", ["plain", "keyword", "no_input_grad", "closure", "nested"])
def test_each_call_takes_the_form_that_gets_its_gradients(call):
    """A keyword tensor that needs a gradient, a positional input that needs none (the layer's own weights would
    get none: "closure" holds its weight as a layer holds its own) or one inside a container: the non-reentrant
    form. Otherwise the reentrant one. The gradients are always those of the uncheckpointed function."""
    x = torch.randn(3, 5, requires_grad=call not in ("no_input_grad", "closure"))
    weight = torch.randn(5, requires_grad=call in ("keyword", "no_input_grad", "closure"))
    wrapper = ReentrantWhereAllowed(functools.partial(checkpoint, use_reentrant=False))
    y = torch.randn(3, 5, requires_grad=True)  # "nested": a positional tensor, and x inside a tuple
    if call == "nested":
        function, args = (lambda first, pair: scaled(pair[0], weight=weight) * first), (y, (x, torch.ones(3, 5)))
    elif call == "closure":
        function, args = (lambda inputs: scaled(inputs, weight=weight)), (x,)
    else:
        function, args = functools.partial(scaled, weight=weight), (x,)
    want_out = function(*args)
    leaves = [t for t in (x, weight) + ((y,) if call == "nested" else ()) if t.requires_grad]
    want = torch.autograd.grad(want_out.sum(), leaves)

    out = wrapper(function, *args)
    out.sum().backward()
    got = [t.grad for t in leaves]
    assert all(g is not None for g in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    expected = REENTRANT if call == "plain" else NON_REENTRANT
    assert wrapper.calls == {expected: 1, ({REENTRANT, NON_REENTRANT} - {expected}).pop(): 0}


def test_reentrant_allowed_reads_the_bound_keywords_and_the_grad_mode():
    x = torch.randn(2, 2, requires_grad=True)
    needs = torch.randn(2, requires_grad=True)
    plain = torch.randn(2)
    assert ac.reentrant_allowed(functools.partial(scaled, weight=plain), (x,), {})
    assert not ac.reentrant_allowed(functools.partial(scaled, weight=needs), (x,), {})
    # transformers binds the layer's keywords in a partial, sometimes a partial of a partial, and nests them
    nested = functools.partial(functools.partial(scaled, weight=plain), extra={"k": [needs]})
    assert not ac.reentrant_allowed(nested, (x,), {})
    assert not ac.reentrant_allowed(scaled, (x,), {"use_reentrant": True})  # a keyword for the checkpoint itself

    class Layer:  # an object holding tensors, as a transformers Cache holds its layers' keys and values
        def __init__(self, keys):
            self.keys = keys

    class Cache:
        def __init__(self, keys):
            self.layers = [Layer(keys)]

    assert not ac.reentrant_allowed(functools.partial(scaled, weight=plain, cache=Cache(needs)), (x,), {})
    assert ac.reentrant_allowed(functools.partial(scaled, weight=plain, cache=Cache(plain)), (x,), {})
    # the layer itself, bound as transformers 5.2x binds it: its own trainable weights are the inner backward's
    module = torch.nn.Linear(2, 2)
    assert module.weight.requires_grad
    assert ac.reentrant_allowed(functools.partial(lambda self, h, weight: h, module, weight=plain), (x,), {})
    with torch.no_grad():
        assert not ac.reentrant_allowed(functools.partial(scaled, weight=plain), (x,), {})


def test_only_transformers_plain_function_is_wrapped_and_only_in_one_process():
    from peftctl.train.distributed import World

    assert ac._plain_non_reentrant(functools.partial(checkpoint, use_reentrant=False))
    # other options (activations offloaded to the host, another check) would be lost by the reentrant call
    assert not ac._plain_non_reentrant(functools.partial(checkpoint, use_reentrant=False, determinism_check="none"))
    assert not ac._plain_non_reentrant(lambda function, *args: checkpoint(function, *args, use_reentrant=False))
    assert ac.reentrant_for(World(rank=0, size=1)) and not ac.reentrant_for(World(rank=1, size=2))


def test_a_model_returning_its_router_logits_keeps_the_non_reentrant_form(tiny_model):
    """Router logits recorded inside a layer carry no graph in the reentrant form: a load-balancing loss on them
    would lose its gradient."""
    from transformers import AutoModelForCausalLM

    from peftctl.model import enable_gradient_checkpointing

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32)
    model.config.output_router_logits = True
    assert enable_gradient_checkpointing(model, reentrant=True) == NON_REENTRANT
    assert ac.form(model) == NON_REENTRANT
    model.config.output_router_logits = False
    assert enable_gradient_checkpointing(model, reentrant=True) == REENTRANT


def test_one_wrapper_per_layer_and_none_when_not_asked(tiny_model):
    model = lora_model(tiny_model("llama"), NON_REENTRANT)
    assert ac.form(model) == NON_REENTRANT
    from peftctl.model import enable_gradient_checkpointing

    base = model.get_base_model()
    assert enable_gradient_checkpointing(base, reentrant=True) == REENTRANT
    assert enable_gradient_checkpointing(base, reentrant=True) == REENTRANT  # again: still one wrapper a layer
    from peftctl.model import decoder_layers

    wrappers = [vars(m)["_gradient_checkpointing_func"] for m in base.modules()
                if "_gradient_checkpointing_func" in vars(m)]
    assert all(isinstance(w, ReentrantWhereAllowed) and not isinstance(w.fallback, ReentrantWhereAllowed)
               for w in wrappers)
    assert all(isinstance(layer._gradient_checkpointing_func, ReentrantWhereAllowed)
               for layer in decoder_layers(base))
