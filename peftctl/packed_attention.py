"""The attention kernel for packed rows, chosen before the first step so that a started run never dies on it.

Packed rows hold several documents each (position_ids restart at 0). Through SDPA, transformers builds a dense
block-diagonal mask from position_ids: SDPA then leaves its flash kernel and computes the whole S x S. The
candidates (peftctl/fast_path.py decides which apply, fastest first):

- varlen: torch's varlen flash attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), registered
  as a transformers attention function. It reads the documents' cumulative lengths, counted on the host by
  `collate` and passed through the model's forward keyword arguments (FlashAttentionKwargs), so no mask is
  built and no forward looks for packed documents on the device. No mask function is registered for it:
  transformers then builds no mask at all (masking_utils returns None for an implementation it has no mask
  function for) and skips its packed-sequence detection -- and its host sync -- with it.
- flex_attention: transformers' flex attention with its packed-document block mask (a compile on first use).
- sdpa: as before.

Each candidate but the last is probed on the run's real shapes (heads, kv heads, head_dim, dtype, rows, row
length): forward and backward against SDPA with an explicit block-diagonal causal mask on the same q/k/v. An
exception or a difference beyond bf16 tolerance moves on to the next, with a note that says why.
"""

from __future__ import annotations

import functools
import inspect

from peftctl.model import base_model

# The names under which transformers' AttentionInterface knows our varlen function: with grouped-query key/value
# heads passed to the kernel as they are (torch 2.11's flash kernel takes fewer key/value heads than query heads:
# the same outputs, 10% faster a call on the H200, no repeated copies kept for the backward pass -- 3 GiB on
# case 2), and with them repeated as transformers' repeat_kv does, where the probe finds a kernel that does not.
VARLEN = "peftctl_varlen"
VARLEN_REPEAT_KV = "peftctl_varlen_repeat_kv"
PROBE_RTOL = 2e-2  # of the largest reference value: bf16 keeps ~3 significant digits, a leak or a wrong scale is O(1)


def varlen_kernel():
    """torch's varlen_attn (tests put a CPU reference in its place)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _call_varlen(kernel, query, key, value, cu_seq_lens, max_length: int, scale: float | None, repeat_kv: bool):
    """Causal varlen attention on (tokens, heads, head_dim) tensors, across torch's signatures: 2.10 takes
    `is_causal=`, 2.11+ `window_size=(-1, 0)` (a tuple: the kernel compares it with one); GQA goes through
    `enable_gqa` where the kernel has it, else the key/value heads go as they are, or repeated (`repeat_kv`) as
    transformers' repeat_kv does."""
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"scale": scale}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif repeat_kv:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return kernel(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, repeat_kv: bool = False, **kwargs):
    """A transformers attention function: q (batch, heads, seq, head_dim), k/v (batch, kv_heads, seq, head_dim)
    in; (batch, seq, heads, head_dim) out. Without the documents' lengths (rows of one example, the isolation
    check's unpacked pass) it is SDPA's causal path."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("the varlen attention kernel has no dropout (fast_path refuses attention dropout)")
    batch, heads, seq, head_dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(batch * seq, t.shape[1], head_dim)  # noqa: E731
    out = _call_varlen(varlen_kernel(), flat(query), flat(key), flat(value), cu_seq_lens_q, int(max_length_q),
                       scaling, repeat_kv)
    return out.view(batch, seq, heads, head_dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(VARLEN_REPEAT_KV, functools.partial(varlen_attention_forward, repeat_kv=True))


def uses_documents(model) -> bool:
    """Whether this model's forward needs the batch's document lengths (its attention is our varlen function)."""
    base = base_model(model)
    return getattr(getattr(base, "config", None), "_attn_implementation", None) in (VARLEN, VARLEN_REPEAT_KV)


def set_attention(model, name: str) -> None:
    base = base_model(model)
    if name in (VARLEN, VARLEN_REPEAT_KV):
        register()
    if base.config._attn_implementation == name:
        return
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:
        base.config._attn_implementation = name


# -- the probe ------------------------------------------------------------------------------------------------


def probe_documents(length: int) -> list[int]:
    """Three documents of unequal length and a trailing pad document, for a row of `length` tokens."""
    if length < 8:
        return [length]
    first, second = length // 2 + 1, length // 4 + 1
    third = max(1, (length - first - second) * 2 // 3)
    rest = length - first - second - third
    return [first, second, third] + ([rest] if rest else [])


def reference_attention(query, key, value, lengths: list[int], scale: float):
    """SDPA with an explicit block-diagonal causal mask: q (batch, heads, seq, hd), k/v (batch, kv_heads, ...),
    every row split into the same `lengths`."""
    import torch
    import torch.nn.functional as F

    seq = query.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(query.device)
    pos = torch.arange(seq, device=query.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale).transpose(1, 2)


def _probe_inputs(shape: dict, device, dtype, seed: int = 0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, length, hd = shape["rows"], shape["length"], shape["head_dim"]
    make = lambda h: (torch.randn(rows, h, length, hd, generator=gen)  # noqa: E731
                      .to(device=device, dtype=dtype).requires_grad_(True))
    return make(shape["heads"]), make(shape["kv_heads"]), make(shape["kv_heads"])


def _run_candidate(kernel: str, q, k, v, lengths: list[int], scale: float, repeat_kv: bool):
    """The candidate's output (batch, seq, heads, hd) as the model would call it."""
    from types import SimpleNamespace

    import torch

    from peftctl.data.packing import cumulative_lengths

    rows, seq = q.shape[0], q.shape[2]
    module = SimpleNamespace(is_causal=True, training=True, num_key_value_groups=q.shape[1] // k.shape[1])
    if kernel == "varlen":
        cu = cumulative_lengths(lengths * rows).to(q.device)
        out, _ = varlen_attention_forward(module, q, k, v, None, scaling=scale, cu_seq_lens_q=cu,
                                          cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
                                          repeat_kv=repeat_kv)
        return out
    if kernel == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask
        from transformers.integrations.flex_attention import flex_attention_forward

        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)

        def same_document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        mask = create_block_mask(same_document, rows, None, seq, seq, device=q.device, _compile=True)
        out, _ = flex_attention_forward(module, q, k, v, mask, scaling=scale)
        return out
    raise ValueError(f"no probe for {kernel}")


def probe(kernel: str, shape: dict, device, dtype, repeat_kv: bool = False) -> str | None:
    """Forward and backward of `kernel` against the masked-SDPA reference on these shapes; None when they agree,
    else why not (one line). `repeat_kv`: varlen with the key/value heads repeated."""
    import torch

    from peftctl.errors import first_line

    lengths = probe_documents(shape["length"])
    scale = shape["head_dim"] ** -0.5
    try:
        q, k, v = _probe_inputs(shape, device, dtype)
        out = _run_candidate(kernel, q, k, v, lengths, scale, repeat_kv)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
        rq, rk, rv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        ref_out = reference_attention(rq, rk, rv, lengths, scale)
        want = [ref_out.detach(), *torch.autograd.grad(ref_out, (rq, rk, rv), grad)]
    except Exception as e:  # noqa: BLE001 - any failure of the candidate means the next one is used
        return f"{type(e).__name__}: {first_line(e)}"[:300]
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        if a.shape != b.shape:
            return f"{name} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}"
        error = (a.float() - b.float()).abs().max().item()
        bound = PROBE_RTOL * max(1e-6, b.float().abs().max().item())
        if not error <= bound:  # NaN fails too
            return f"{name} differs from SDPA with a block mask by {error:.3g} (tolerance {bound:.3g})"
    return None


def attention_shape(config, rows: int, length: int) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"heads": heads, "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": head_dim, "rows": rows, "length": length}


def choose(model, candidates: list[str], refused: list[dict], *, rows: int, length: int, device, dtype,
           say) -> dict:
    """Probe the candidates in order, set the model's attention to the first that passes (the last is taken as
    it is), and return the record for run.json: {"kernel": ..., "tried": [{"kernel", "refused"}, ...]}."""
    tried = list(refused)
    shape = attention_shape(model.config, rows, length)
    for i, kernel in enumerate(candidates[:-1]):
        name = VARLEN if kernel == "varlen" else kernel
        why = probe(kernel, shape, device, dtype)
        if why is not None and name == VARLEN and shape["kv_heads"] < shape["heads"]:  # again, the heads repeated
            tried.append({"kernel": "varlen with grouped-query heads as they are", "refused": why})
            name = VARLEN_REPEAT_KV
            why = probe(kernel, shape, device, dtype, repeat_kv=True)
        if why is None:
            set_attention(model, name)
            return {"kernel": kernel, "tried": tried}
        tried.append({"kernel": kernel, "refused": why})
        say(f"note: packed attention: {kernel} failed its probe on these shapes, {candidates[i + 1]} instead: {why}")
    # The last candidate is what the model was loaded with (the recipe's kernel, or transformers' default).
    return {"kernel": model.config._attn_implementation, "tried": tried}


def choose_for_run(model, recipe, device, *, packed: bool, say) -> dict:
    """The packed-attention decision of a training run (peftctl/fast_path.py's rule, then the probes): sets the
    model's attention and returns the record for run.json's fast_path.attention."""
    import torch

    from peftctl.data.prepare import largest_micro_batch_rows
    from peftctl.fast_path import autocast_name, document_kernel_refusal, packed_attention_candidates

    dtype = autocast_name(recipe, device.type)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    refusal = document_kernel_refusal(getattr(model.config, "model_type", None), config, recipe.dataset.max_length)
    candidates, refused = packed_attention_candidates(
        setting=recipe.model.attn_implementation, packed=packed, device_type=device.type, dtype=dtype,
        refusal=refusal)
    if len(candidates) == 1:
        return {"kernel": model.config._attn_implementation, "tried": refused}
    rows = largest_micro_batch_rows(recipe.training, recipe.dataset.max_length)
    return choose(model, candidates, refused, rows=rows, length=recipe.dataset.max_length, device=device,
                  dtype=getattr(torch, dtype) if dtype else model.dtype, say=say)


def unchoose(model, record: dict, loaded_with: str, why: str) -> dict:
    """Back to the kernel the model was loaded with, after the chosen one failed the packing isolation check."""
    set_attention(model, loaded_with)
    return {"kernel": loaded_with, "tried": record["tried"] + [{"kernel": record["kernel"], "refused": why}]}
