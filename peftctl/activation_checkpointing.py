"""Activation checkpointing of the decoder layers: torch's reentrant form where a layer's call allows it.

transformers checkpoints each decoder layer through `torch.utils.checkpoint` and peftctl asks for the non-reentrant
form, which is correct for any call. Its cost is the host's: the first forward builds the layer's whole autograd
graph and sends every tensor it would save through Python pack hooks, and the backward pass unpacks them through
Python again and compares the recomputed tensors' metadata. On a QLoRA step the host bounds (8B, one row of 2,048
tokens) that is a tenth of the step: the median step fell 0.68 / 0.70 s -> 0.62 / 0.58 s with the reentrant form
(H200, two rounds, same losses and peak memory; benchmarks/2026-12-02/issue21/host_variants.py). The reentrant form
runs the first forward without grad -- no graph, no saved tensors, no hooks -- and in the backward pass reruns the
layer with grad on and calls backward on it.

Its known limits decide where it is used, per call (`reentrant_allowed`):

- gradients flow only through the positional tensors the layer is called with: a tensor that needs a gradient in a
  keyword argument (transformers passes the layer's keywords bound in a `functools.partial`) or inside a container
  would get none, and a call whose positional tensors need none would leave the layer's own trainable weights
  without gradients. Such calls take the non-reentrant form;
- DDP and FSDP hook into the backward pass per parameter; the nested backward of the reentrant form breaks their
  bookkeeping, so several processes keep the non-reentrant form throughout (`reentrant_for`);
- tensors that a forward hook records inside a layer carry no graph in the reentrant form. peftctl's losses read
  none, but a model configured to return its router logits (`output_router_logits`, for a load-balancing loss)
  keeps the non-reentrant form;
- only transformers' plain non-reentrant function is wrapped: one set up otherwise (activations offloaded to the
  host, other checkpoint options) stays as it is.

Both forms restore the random generators before recomputing (dropout draws the same mask) and the autocast state.
run.json records the form set up (`fast_path.activation_checkpointing`) and how many layer calls took each
(`fast_path.activation_checkpointing_calls`).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

REENTRANT = "reentrant"
NON_REENTRANT = "non_reentrant"


def _needs_grad(value, depth: int = 0) -> bool:
    """Whether `value` is, or holds a few levels down (lists, tuples, dicts, and the attributes of other objects, a
    transformers Cache's layers for one), a tensor that needs a gradient. A module's own weights do not count: the
    reentrant form's inner backward reaches them."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if depth > 4 or value is None or isinstance(value, (bool, int, float, str, torch.nn.Module)):
        return False
    if isinstance(value, (list, tuple)):
        return any(_needs_grad(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_needs_grad(v, depth + 1) for v in value.values())
    attributes = getattr(value, "__dict__", None)
    return attributes is not None and any(_needs_grad(v, depth + 1) for v in attributes.values())


def reentrant_allowed(function, args, kwargs) -> bool:
    """Whether the reentrant form computes the same gradients for `function(*args)`: a positional tensor needs a
    gradient, none does inside a container or among the keywords bound to `function` (a functools.partial, as
    transformers passes them), and no keyword goes to the checkpoint itself."""
    if kwargs or not torch.is_grad_enabled():
        return False
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return False
    if any(not isinstance(a, torch.Tensor) and _needs_grad(a) for a in args):
        return False
    while isinstance(function, functools.partial):
        if _needs_grad(function.args) or _needs_grad(function.keywords):
            return False
        function = function.func
    return True


class ReentrantWhereAllowed:
    """A layer's checkpoint function: torch's reentrant checkpoint where `reentrant_allowed`, else the function
    transformers set (non-reentrant). `calls` counts the calls each form took."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.calls = {REENTRANT: 0, NON_REENTRANT: 0}

    def __call__(self, function, *args, **kwargs):
        if reentrant_allowed(function, args, kwargs):
            self.calls[REENTRANT] += 1
            return checkpoint(function, *args, use_reentrant=True)
        self.calls[NON_REENTRANT] += 1
        return self.fallback(function, *args, **kwargs)


def reentrant_for(world) -> bool:
    """Whether a run of these processes may take the reentrant form: one process only (DDP and FSDP need the
    non-reentrant one)."""
    return not world.distributed


def _plain_non_reentrant(func) -> bool:
    """Whether `func` is transformers' checkpoint function with no option but the non-reentrant form."""
    return (isinstance(func, functools.partial) and func.func is checkpoint and not func.args
            and func.keywords == {"use_reentrant": False})


def enable(model, *, reentrant: bool) -> str:
    """Checkpoint every decoder layer of `model` (a transformers model); with `reentrant`, through
    `ReentrantWhereAllowed`. Returns the form asked for (REENTRANT or NON_REENTRANT), as run.json records it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The embedding's output needs a gradient, so that the first layer's input does (a frozen base has no weight
    # before it that would give it one).
    model.enable_input_require_grads()
    if reentrant and not getattr(model.config, "output_router_logits", False):
        for module, fallback in _checkpoint_functions(model):
            if _plain_non_reentrant(fallback):
                module._gradient_checkpointing_func = ReentrantWhereAllowed(fallback)
    return form(model) or NON_REENTRANT


def _checkpoint_functions(model) -> list[tuple]:
    """(module, its checkpoint function) for every module transformers set one on."""
    return [(m, f) for m in model.modules() if (f := vars(m).get("_gradient_checkpointing_func")) is not None]


def form(model) -> str | None:
    """The form `enable` set on `model` (None: not checkpointed)."""
    funcs = [f for _, f in _checkpoint_functions(model)]
    if any(isinstance(f, ReentrantWhereAllowed) for f in funcs):
        return REENTRANT
    return NON_REENTRANT if funcs else None


def forms_taken(model) -> dict[str, int]:
    """How many layer calls took each form so far (summed over the layers)."""
    total = {REENTRANT: 0, NON_REENTRANT: 0}
    for _, func in _checkpoint_functions(model):
        if isinstance(func, ReentrantWhereAllowed):
            for taken, n in func.calls.items():
                total[taken] += n
    return total
