"""LoRA's branch as one autograd function: the same sums as peft's layer, fewer passes over memory.

peft computes an adapted layer as `result.clone() + lora_B(lora_A(dropout(x))) * scaling` (the clone on 4-bit
layers only). On a long batch most of those steps are memory passes, not arithmetic: the clone, the B output, the
scaling and the sum each read or write a tensor as wide as the layer's output (14,336 wide for an 8B MLP), and
dropout keeps a masked copy of the input for every adapted layer, although q, k and v share the same input. Here:

- forward: dropout (torch's own kernel), `h = dropped @ A^T` (a tokens x r tensor), then
  `out = torch.addmm(result, h, B^T, alpha=scaling)`: the scaling and the sum inside one BLAS call (which reads
  `result` as its C operand), where peft clones, writes B's output, scales it and sums, each a separate pass.
- backward: the gradient of `result` is the incoming gradient itself (no copy); the scaling is applied to the
  small tensors; dropout's backward kernel masks x's gradient.
- saved: what peft's layers save (the dropped input, dropout's mask, `h`), so memory, and the memory plan, stay as
  they were. (Rebuilding the dropped input from x and the mask in the backward pass saved 8 GiB on an 8B QLoRA run
  but cost more time than the fusion gained: BENCHMARKS.md.)

Where the base layer is a frozen `nn.Linear` or a bitsandbytes 4-bit layer (peftctl's own base layers), the
function computes the base too (`_owns_base`): its output is written by the base's own forward inside the
function, so the branch is added into that very buffer (`addmm_`: torch's out-of-place addmm first copies its C
operand, a full pass over the output), and x's gradient is one buffer -- the branch's, into which the base's
`grad @ W` (W dequantised as bitsandbytes' backward does) is accumulated by the same GEMM -- instead of two tensors
that autograd then sums in another pass. Same sums; the base's part of x's gradient is rounded to the activations'
dtype once, with the branch's, instead of twice. An NF4 weight is dequantised by peftctl's one-launch kernel
(train/nf4_kernel.py) wherever it reads the weight as bitsandbytes does: the same values, a third of the launches.
Where the run keeps them (quantization.keep_dequantized, as the memory plan decides), that matrix is made once and
kept on the layer: the weight is frozen, so neither pass of any later step dequantises.

With dropout on a CUDA device (and triton there, in a dtype and at an r it supports: peftctl/fast_path.py, which
the memory plan reads too), the branch may take LoRA's dropout kernel instead of torch's (`_KernelDropout`, not
`_TorchDropout`): the mask is drawn inside the LoRA-A product from a seed and drawn again in the backward pass, so
the layer keeps x itself (shared by q/k/v, gate/up) instead of a dropped copy and a mask. Same sums, same
distribution, other draws.

The mask comes from torch's generator on x's device (dropout's, or the kernel's seed), so activation
checkpointing, which restores that generator's state before recomputing, draws the same mask again.

Used only where it is the same computation as peft's: one active plain LoRA adapter (no DoRA or other variant,
no LoRA bias, not merged, adapters enabled) on a Linear layer, full precision or bitsandbytes 4/8-bit, with the
activations and the adapter computing in one dtype (under autocast: the autocast dtype, as peft's layers do). Any
other call goes to peft's own forward.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
from torch import nn

from peftctl.fast_path import BNB_DEQUANT_MIN_ROWS


def _add_product(result2, base, x2, h, b, scaling: float, dtype):
    """result + scaling * h @ B^T, `b` being B in the activations' dtype. With `base` (result2 None): the base's
    output computed here, and the product added into its buffer where it is a plain tensor of the right dtype
    (anything else is summed out of place)."""
    if result2 is None:
        # grad mode is off inside a Function's forward: x's gradient through W is ours
        result2 = _base_forward(base, x2, dtype)
        if result2.dtype == dtype and result2.is_contiguous() and not result2._is_view():
            return result2.addmm_(h, b.t(), alpha=scaling)
    return torch.addmm(result2.to(dtype), h, b.t(), alpha=scaling)


class _TorchDropout:
    """Dropout through torch's own kernels (p = 0: none): the dropped copy and the mask are kept, as peft keeps
    them."""

    @staticmethod
    def forward(x2, weight_a, p: float):
        """(h = dropout_p(x) @ A^T, what the backward pass needs)."""
        dropped, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)
        return dropped @ weight_a.t(), (dropped, mask)

    @staticmethod
    def grad_a(grad_h, saved, p: float):
        return grad_h.t() @ saved[0]

    @staticmethod
    def grad_x(grad_h, weight_a, saved, p: float):
        grad_x = grad_h @ weight_a
        mask = saved[1]
        return grad_x if mask is None else torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))


class _KernelDropout:
    """LoRA's dropout kernel (train/lora_dropout_kernel.py): the mask drawn inside the LoRA-A product from a seed
    and drawn again in the backward pass; x itself and the seed are kept, no dropped copy and no mask."""

    @staticmethod
    def forward(x2, weight_a, p: float):
        from peftctl.train import lora_dropout_kernel as kernel

        seed = kernel.draw_seed(x2.device)
        return kernel.dropout_a_forward(x2, weight_a, seed, p), (x2, seed)

    @staticmethod
    def grad_a(grad_h, saved, p: float):
        from peftctl.train import lora_dropout_kernel as kernel

        return kernel.dropout_a_grad_weight(grad_h, saved[0], saved[1], p)

    @staticmethod
    def grad_x(grad_h, weight_a, saved, p: float):
        from peftctl.train import lora_dropout_kernel as kernel

        return kernel.dropout_a_grad_input(grad_h, weight_a, saved[1], p, grad_h.dtype)


class _LoraBranch(torch.autograd.Function):
    """out = base(x) + scaling * (dropout_p(x) @ A^T) @ B^T, the dropout drawn by `dropout` (_TorchDropout or
    _KernelDropout); the base's output given as `result2` (its gradient passed back to it), or computed here from
    `base` (x's gradient through it then ours too)."""

    @staticmethod
    def forward(ctx, x2, result2, weight_a, weight_b, p: float, scaling: float, base, dropout):
        dtype = x2.dtype
        # The adapter's weights in the activations' dtype, kept for the backward pass (r x (in + out) elements): the
        # backward pass then launches no casts of its own. On a long batch a step is bound by how fast the host
        # launches kernels as much as by the GPU, and a LoRA layer's kernels are many and small.
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        h, saved = dropout.forward(x2, a, p)
        out = _add_product(result2, base, x2, h, b, scaling, dtype)
        ctx.save_for_backward(h, a, b, *saved)
        ctx.p, ctx.scaling, ctx.base, ctx.dropout, ctx.dtype = p, scaling, base, dropout, dtype
        ctx.weight_dtypes = weight_a.dtype, weight_b.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, a, b, *saved = ctx.saved_tensors
        needs_x, needs_result, needs_a, needs_b = ctx.needs_input_grad[:4]
        dtype, (a_dtype, b_dtype) = ctx.dtype, ctx.weight_dtypes
        g = grad_out.to(dtype)
        # B's side, the scaling applied to the small tensors inside their GEMMs (alpha; beta 0 ignores the input)
        unused_c = g.new_empty(())
        grad_b = torch.addmm(unused_c, g.t(), h, beta=0, alpha=ctx.scaling).to(b_dtype) if needs_b else None
        grad_h = torch.addmm(unused_c, g, b, beta=0, alpha=ctx.scaling) if needs_x or needs_a else None
        grad_a = ctx.dropout.grad_a(grad_h, saved, ctx.p).to(a_dtype) if needs_a else None
        grad_x = None
        if needs_x:
            grad_x = ctx.dropout.grad_x(grad_h, a, saved, ctx.p)
            if ctx.base is not None:  # the base's part accumulated into the same buffer by the GEMM (C operand)
                grad_x = grad_x.addmm_(g, _base_matrix(ctx.base, dtype))
        return grad_x, (grad_out if needs_result else None), grad_a, grad_b, None, None, None, None


def dropout_kernel_applies(x2: torch.Tensor, weight_a: torch.Tensor, p: float) -> bool:
    """Whether this call's branch goes through the dropout kernel (the rule of peftctl/fast_path.py, which the
    memory plan reads too); the triton import is only attempted for a device the kernel runs on."""
    from peftctl import fast_path

    if x2.device.type not in fast_path.LORA_DROPOUT_KERNEL_DEVICES or not p > 0:
        return False
    return fast_path.lora_dropout_kernel_applies(device_type=x2.device.type, dropout=p,
                                                 dtype=str(x2.dtype).removeprefix("torch."), r=weight_a.shape[0],
                                                 elements=x2.numel(), triton=fast_path.triton_available())


def lora_branch(x, result, weight_a, weight_b, p: float, scaling: float, dropout_kernel: bool = True, base=None):
    """`result + scaling * B(A(dropout_p(x)))`; pass p = 0 outside training. `result` is the base layer's output;
    or pass `result=None` and the frozen base layer as `base` (one `_owns_base` accepts) to have it computed here.

    The reshapes to 2-D and back happen out here, not inside the Function: a view created inside a custom Function
    may not be modified in place, and some models add to a projection's output in place (Falcon's attention), which
    plain peft allows. A view of a Function's plain output may be modified in place like any other tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    dropout = _KernelDropout if dropout_kernel and dropout_kernel_applies(x2, weight_a, p) else _TorchDropout
    result2 = None if result is None else result.reshape(-1, result.shape[-1])
    out = _LoraBranch.apply(x2, result2, weight_a, weight_b, p, scaling, base, dropout)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _bnb_4bit_type():
    import sys

    module = sys.modules.get("bitsandbytes.nn")  # a 4-bit layer exists only where bitsandbytes was imported
    return getattr(module, "Linear4bit", None)


def _plain_reads():
    """A context in which reading a weight's metadata (device, dtype, shape, `.data`) skips its class's
    `__torch_function__`. bitsandbytes' Params4bit has one in Python, so each such read of a 4-bit weight costs
    3-5 us where a plain tensor's costs 0.3 (measured here: 12 us against 1.4 for four reads), and the fused
    branch read its base's weight about 20 times a call: some 7,000 reads, 30 ms, of the host's time in a step of an
    8B QLoRA run with checkpointing, which the host bounds. The reads see the same values. Only the weight's reads
    and the dequantisation run in it: no import, and not the product with x (x keeps its own torch function)."""
    return torch._C.DisableTorchFunctionSubclass()


def _owns_base(base, x) -> bool:
    """Whether the fused function may compute this base layer itself: a frozen `nn.Linear` (no subclass) or a
    frozen bitsandbytes 4-bit layer computing in x's dtype, with no hooks (accelerate's offload moves weights in
    around the forward: the backward could not read them)."""
    weight = base.weight
    with _plain_reads():
        frozen = not weight.requires_grad and (getattr(base, "bias", None) is None or not base.bias.requires_grad)
        if not frozen or base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in vars(base):
            return False
        if type(base) is nn.Linear:
            return True
        linear_4bit = _bnb_4bit_type()
        return (linear_4bit is not None and type(base) is linear_4bit and weight.device == x.device
                and base.compute_dtype in (None, x.dtype) and getattr(weight, "quant_state", None) is not None)




def _nf4_kernel(weight, dtype):
    """peftctl's NF4 kernel module where it reads this weight the way bitsandbytes does, else None. The device rule
    is asked first: triton (imported by the kernel's module) is only there on some platforms. The imports run
    before the weight is read past its torch function, so no import runs in that context."""
    from peftctl import fast_path

    with _plain_reads():
        device_type = weight.device.type
    if not fast_path.nf4_kernel_applies(device_type):
        return None
    from peftctl.train import nf4_kernel

    with _plain_reads():
        return nf4_kernel if nf4_kernel.applies(weight, dtype) else None


def _base_forward(base, x2, dtype):
    """The base layer's output. A long batch through a 4-bit layer that peftctl's NF4 kernel reads, or whose matrix
    is kept: that matrix (the kernel's: one launch, against bitsandbytes' three) multiplied by F.linear, what
    bitsandbytes' own forward does there. Its forward dequantises straight into the compute dtype, which gives the
    matrix's values only where the weight was quantised from that dtype; elsewhere, and for anything else, the
    layer's own forward runs."""
    if type(base) is not nn.Linear and x2.shape[0] >= BNB_DEQUANT_MIN_ROWS:
        matrix = _dequantised(base, dtype, forward=True)
        if matrix is not None:
            bias = None if base.bias is None else base.bias.to(dtype)
            return torch.nn.functional.linear(x2, matrix, bias)
    return base(x2)


def _base_matrix(base, dtype):
    """The (out x in) matrix x's gradient goes through: the weight, or the 4-bit weight dequantised as
    bitsandbytes' own backward does."""
    if type(base) is nn.Linear:
        return base.weight.to(dtype)
    return _dequantised(base, dtype)


class _Kept(NamedTuple):
    """A kept matrix and what it was made from."""

    dtype: torch.dtype
    weight: torch.Tensor
    state: object  # bitsandbytes' QuantState
    pointer: int
    matrix: torch.Tensor


def _dequantised(base, dtype, *, forward: bool = False):
    """A 4-bit base layer's weight as an (out x in) matrix in `dtype`, as bitsandbytes' backward makes it: by
    peftctl's kernel where it gives bitsandbytes' values, else by bitsandbytes. `forward`: None instead where
    bitsandbytes' forward would give other values (the weight not quantised from `dtype`), or where neither the
    kernel nor a kept matrix saves it a dequantisation.

    Where the run keeps them (keep_dequantized), the first call's matrix stays on the layer and later calls return
    it: the weight is frozen, so every step would make the same matrix again. It is kept with the very weight and
    quantisation state it came from, and made again if either was replaced (peft's merge swaps in a new
    Params4bit, which may reuse the old one's memory)."""
    with _plain_reads():
        weight = base.weight
        state, pointer = weight.quant_state, weight.data_ptr()
    if forward and state.dtype != dtype:
        return None
    kept = getattr(base, "_peftctl_dequantized", None)
    if (kept is not None and kept.dtype == dtype and kept.weight is weight and kept.state is state
            and kept.pointer == pointer):
        return kept.matrix
    kernel = _nf4_kernel(weight, dtype)
    if kernel is not None:
        with _plain_reads():
            matrix = kernel.dequantize_nf4(weight, dtype)
    elif forward and not _kept(base):
        return None
    else:
        import bitsandbytes.functional as bnb_functional

        matrix = bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
    if _kept(base):
        # a plain attribute: not in the state dict, not moved by .to()
        base._peftctl_dequantized = _Kept(dtype, weight, state, pointer, matrix)
    return matrix


def _kept(base) -> bool:
    return getattr(base, "peftctl_keep_dequantized", False)


def keep_dequantized(model, keep: bool) -> int:
    """Have the fused branch keep each 4-bit base layer's dequantised matrix (quantization.keep_dequantized, as the
    memory plan decides it), or drop the kept ones (keep False: at the end of training, before a merge or anything
    else needs the memory). Returns how many layers keep theirs.

    Marked: the layers routed through the fused branch whose base computes in the activations' dtype (the model's
    input embedding's), where the fused branch computes the base itself (`_owns_base`); the memory plan's rule
    (plan/estimate.kept_matrices) is the same. The others go through bitsandbytes' own forward, or peft's."""
    layer_4bit = _bnb_4bit_type()
    if layer_4bit is None:
        return 0
    activations = model.get_input_embeddings().weight.dtype
    marked, dropped = 0, False
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if type(base) is not layer_4bit:
            continue
        if not keep:
            base.peftctl_keep_dequantized = False
            dropped |= base.__dict__.pop("_peftctl_dequantized", None) is not None
        elif getattr(module.forward, "__func__", None) is _fused_forward and base.compute_dtype in (None, activations):
            base.peftctl_keep_dequantized = True
            marked += 1
    if dropped and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the merge after training sizes its work by the device's free memory
    return marked


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The dtype peft's layer would compute the branch in, or None where the fused branch would differ."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if x.dtype == dtype else None
    return x.dtype if x.dtype == weight.dtype else None


def _fused_forward(self, x, *args, **kwargs):
    active = [name for name in self.active_adapters if name in self.lora_A]
    plain = (not self.disable_adapters and not self.merged and not args and not kwargs and len(active) == 1
             and not _has_variant_or_bias(self))
    if plain:
        name = active[0]
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        plain = _compute_dtype(x, lora_a.weight) is not None
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    kernel = getattr(self, "peftctl_dropout_kernel", True)
    if _owns_base(self.base_layer, x):
        return lora_branch(x, None, lora_a.weight, lora_b.weight, p, self.scaling[name], dropout_kernel=kernel,
                           base=self.base_layer)
    result = self.base_layer(x)
    return lora_branch(x, result, lora_a.weight, lora_b.weight, p, self.scaling[name],
                       dropout_kernel=kernel).to(result.dtype)


def _fusable_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    types_ = [layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb
    except Exception:  # noqa: BLE001 - bitsandbytes missing or failing to initialise
        return tuple(types_)
    types_ += [getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n)]
    return tuple(types_)


def fuse_lora_layers(model, *, dropout_kernel: bool = True) -> int:
    """Route every plain LoRA Linear layer of `model` through the fused branch; returns how many were routed.
    `dropout_kernel`: whether the branch may take LoRA's dropout kernel where it applies (the loop asks the memory
    plan: only where the run needs the memory, since the kernel is slower than torch's dropout).

    The layer keeps its parameters, state dict and class (saving, merging and peft's own methods are unchanged);
    only the instance's forward changes, and it falls back to the class's forward for anything it does not cover.
    """
    fusable = _fusable_layer_types()
    routed = 0
    for module in model.modules():
        if type(module) in fusable and not _has_variant_or_bias(module):
            module.forward = types.MethodType(_fused_forward, module)
            module.peftctl_dropout_kernel = dropout_kernel
            routed += 1
    return routed


def dropout_kernel_layers(model, device_type: str, autocast_dtype, tokens: int) -> int:
    """How many routed layers will take the dropout kernel in training (run.json names the kernel where any does):
    the per-call rule (dropout_kernel_applies) for the dtype the branch computes in -- the autocast dtype where the
    activations are in it, else the adapter's own where they match it (elsewhere peft's forward runs)."""
    from peftctl import fast_path

    activations = model.get_input_embeddings().weight.dtype
    count = 0
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is not _fused_forward or not module.peftctl_dropout_kernel:
            continue
        for name, lora_a in module.lora_A.items():
            dtype = autocast_dtype if autocast_dtype is not None else lora_a.weight.dtype
            dropout = module.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            count += activations == dtype and fast_path.lora_dropout_kernel_applies(
                device_type=device_type, dropout=p, dtype=str(dtype).removeprefix("torch."),
                r=lora_a.weight.shape[0], elements=tokens * lora_a.weight.shape[1],
                triton=device_type in fast_path.LORA_DROPOUT_KERNEL_DEVICES and fast_path.triton_available())
    return count


def _has_variant_or_bias(module) -> bool:
    """DoRA (a variant) or a LoRA bias on any of the layer's adapters: peft's forward computes those. Checked when
    layers are routed (so run.json claims the fused branch only where it runs) and on every call (an adapter added
    after routing)."""
    if getattr(module, "lora_variant", None) or any(getattr(module, "use_dora", {}).values()):
        return True
    return any(b.bias is not None for b in module.lora_B.values())
