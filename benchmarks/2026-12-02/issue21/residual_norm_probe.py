"""A probe, not part of peftctl: measured and dropped in issue 21's eleventh round (BENCHMARKS.md; runs AF-AH: 0.995x
and 1.008x on case 1's layers, 0.995x on all-linear layers, in steps taking turns). It was
peftctl/train/residual_norm.py, routed by the loop after train/kernels.apply_fast_kernels, with CPU tests (torch
kernels standing in for liger's) and a GPU test (the stock layers' forward bit for bit, gradient cosine 0.99995).

The decoder layer's residual sums inside its RMSNorm kernels (liger's fused add-RMSNorm), on the GPU fast path.

A Llama-shaped decoder layer computes `s = x + attn(norm1(x))`, then `out = s + mlp(norm2(s))`. With liger's
RMSNorm patched in (train/kernels.py), its residual stream still costs three passes of their own, each reading
two (tokens x hidden) tensors and writing one: the sum `x + attn` in the forward pass, and in the backward pass
autograd's sums of the two gradients that reach x and s (each is read by a norm and by a residual sum).

Here those three passes happen inside the norms' kernels:

- forward: norm2 is liger's fused add-RMSNorm, which writes s and norm2(s) from `attn` and x in one pass; norm1
  is liger's plain RMSNorm, and hands x on as the residual;
- backward: each norm's kernel adds the residual's gradient into the input gradient it writes (liger's fused
  add-RMSNorm backward, which takes that gradient as an extra input).

The sum `s + mlp(...)` stays an add: its backward passes the gradient through without a kernel.

The same values: s is rounded to the activations' dtype as torch's add rounds it, and the norm is computed from
that rounded s as liger's RMSNorm computes it, so every forward output is the stock layer's, bit for bit. In the
backward pass the norm's gradient and the residual's are summed in float32 and rounded once, where autograd
rounds the norm's and sums the two in the activations' dtype.

Only where the layer's forward is the stock one of a model type checked for it (RESIDUAL_NORM_MODEL_TYPES) and
both norms are liger's in Llama's casting without an offset; any other call (positional arguments, a norm changed
later) goes to the class's forward. Memory: the norms save what liger's RMSNorm saves (their input and an inverse
RMS a row), so the memory plan is unchanged.
"""

from __future__ import annotations

import torch

from peftctl.model import decoder_layers

# Decoder layers whose forward is `residual + attn(input_layernorm(x))`, then `residual + mlp(post_attention_
# layernorm(...))`, calling self_attn with every keyword the layer gets: compared with Llama's in transformers
# 5.24 (the same source for these four), and a subset of liger's patch table (fast_path.LIGER_MODEL_TYPES).
RESIDUAL_NORM_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class _LigerKernels:
    """liger's kernels, in the calling convention _ResidualRMSNorm uses: a forward gives (y, s, rstd, settings),
    the backward (dx, dweight or None)."""

    @staticmethod
    def forward(x, residual, weight, eps: float):
        from liger_kernel.ops import fused_add_rms_norm, rms_norm

        if residual is None:
            extra = (None,) if _takes_row_mode(rms_norm.rms_norm_forward) else ()
            y, s, rstd, block, warps, casting = rms_norm.rms_norm_forward(x, weight, eps, 0.0, "llama", *extra)
            return y, x, rstd, (casting, block, warps, 2)
        y, s, rstd, block, warps, stages, casting = fused_add_rms_norm.fused_add_rms_norm_forward(
            x, residual, weight, eps, 0.0, "llama")
        return y, s, rstd, (casting, block, warps, stages)

    @staticmethod
    def backward(grad_y, grad_s, s, weight, rstd, settings, in_place: bool, needs_weight: bool):
        from liger_kernel.ops import fused_add_rms_norm

        casting, block, warps, stages = settings
        grad_x, _, grad_weight = fused_add_rms_norm.fused_add_rms_norm_backward(
            grad_y, grad_s, s, weight, rstd, 0.0, casting, block, warps, stages, in_place, needs_dw=needs_weight)
        return grad_x, grad_weight


def _takes_row_mode(function) -> bool:
    import inspect

    return "row_mode" in inspect.signature(function).parameters


class _ResidualRMSNorm(torch.autograd.Function):
    """(norm(s), s) with s = x + residual, or s = x itself where `residual` is None. The backward pass gets the
    gradients of both outputs and writes s's input gradient in one kernel (x's and the residual's: the same)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, in_place: bool, kernels):
        x = x.contiguous()
        residual = None if residual is None else residual.contiguous()
        y, s, rstd, settings = kernels.forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.settings, ctx.in_place, ctx.kernels = settings, in_place, kernels
        ctx.has_residual = residual is not None
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s):
        s, weight, rstd = ctx.saved_tensors
        needs_x, needs_residual, needs_weight = ctx.needs_input_grad[:3]
        grad_x, grad_weight = ctx.kernels.backward(grad_y.contiguous(), grad_s.contiguous(), s, weight, rstd,
                                                   ctx.settings, ctx.in_place, needs_weight)
        grad_residual = grad_x if ctx.has_residual and needs_residual else None
        return (grad_x if needs_x else None), grad_residual, grad_weight, None, None, None


# The stock norms of RESIDUAL_NORM_MODEL_TYPES (the same source as LlamaRMSNorm's in transformers 5.24).
_STOCK_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def _llama_rms_norm(norm) -> bool:
    """Whether `norm` computes Llama's RMSNorm, which the kernels compute: liger's patched in with Llama's casting
    and no offset (train/kernels.py), or the model's stock one. Read without importing liger."""
    if norm is None or getattr(norm, "weight", None) is None or not hasattr(norm, "variance_epsilon"):
        return False
    if "forward" in vars(norm):  # patched on the instance: only liger's, as train/kernels patches it
        function = getattr(norm.forward, "__func__", None)
        return (getattr(function, "__qualname__", "") == "LigerRMSNorm.forward"
                and getattr(function, "__module__", "").startswith("liger_kernel.")
                and getattr(norm, "offset", None) == 0.0 and getattr(norm, "casting_mode", None) == "llama")
    return type(norm).__name__ in _STOCK_NORMS and not norm._forward_hooks and not norm._forward_pre_hooks


def _fused_forward(self, hidden_states, *args, **kwargs):
    norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
    if args or not (_llama_rms_norm(norm1) and _llama_rms_norm(norm2)):
        return self.peftctl_stock_class.forward(self, hidden_states, *args, **kwargs)
    kernels = self.peftctl_residual_kernels
    y, residual = _ResidualRMSNorm.apply(hidden_states, None, norm1.weight, norm1.variance_epsilon,
                                         getattr(norm1, "in_place", False), kernels)
    attn, _ = self.self_attn(hidden_states=y, **kwargs)
    y, residual = _ResidualRMSNorm.apply(attn, residual, norm2.weight, norm2.variance_epsilon,
                                         getattr(norm2, "in_place", False), kernels)
    return residual + self.mlp(y)


_ROUTED: dict[type, type] = {}


def _routed_class(stock: type) -> type:
    """The layer's class with the fused forward: a subclass of the same name, so that whatever transformers does
    around a layer's forward (its activation checkpointing wraps each subclass's `forward` from 5.2x on, and
    `__call__` before) wraps this forward as it wraps the stock one. The stock forward stays reachable for the
    calls the routing does not cover."""
    if stock not in _ROUTED:
        _ROUTED[stock] = type(stock.__name__, (stock,), {
            "forward": _fused_forward, "peftctl_stock_class": stock,
            "__module__": stock.__module__, "__qualname__": stock.__qualname__,
            "__doc__": f"{stock.__name__} with its residual sums inside the norms (peftctl/train/residual_norm.py)."})
    return _ROUTED[stock]


def fuse_residual_norms(model, device, kernels=None) -> int:
    """Route every decoder layer of `model` through the fused residual norms; returns how many were routed (0
    where they do not apply: not on a CUDA device, a model type not checked for it, liger's norms not patched in,
    or a liger without the fused add-RMSNorm). Call after train/kernels.apply_fast_kernels, before the adapter.
    `kernels`: the kernels to use (liger's by default; tests pass their own)."""
    if kernels is None:
        if device.type != "cuda" or not _liger_has_fused_add():
            return 0
        kernels = _LigerKernels
    if getattr(model.config, "model_type", None) not in RESIDUAL_NORM_MODEL_TYPES:
        return 0
    routed = 0
    for layer in decoder_layers(model):
        if ("forward" in vars(layer) or layer._forward_hooks or layer._forward_pre_hooks
                or type(layer) in _ROUTED.values()):
            continue  # somebody else's forward or hooks on the layer, or routed already: left as it is
        norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
        if not all(map(_llama_rms_norm, norms)) or not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
            continue
        layer.__class__ = _routed_class(type(layer))
        layer.peftctl_residual_kernels = kernels
        routed += 1
    return routed


def _liger_has_fused_add() -> bool:
    try:
        from liger_kernel.ops import fused_add_rms_norm, rms_norm  # noqa: F401 - the fused one since liger 0.6
    except Exception:  # noqa: BLE001 - an older or broken liger: the stock layer runs
        return False
    return True
