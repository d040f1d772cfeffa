"""Where each model parameter lives in the checkpoint, read from the model's own mapping, never from Llama's names.

Most parameters are stored under their own name. The rest come in three kinds:
- tied weights (an output head that shares the input embedding: stored once, under the embedding's name);
- renamed ones (Mixtral's `block_sparse_moe.` is the model's `mlp.`);
- converted ones: current transformers fuses a mixture-of-experts layer's experts into 3-D parameters
  (`mlp.experts.gate_up_proj` of shape (experts, 2 x intermediate, hidden)) that checkpoints store per expert
  (`experts.0.w1.weight`, `experts.0.w3.weight`, ...).
transformers knows the conversions (`revert_weight_conversion`, which `save_pretrained` runs); this module asks it
which rows of a parameter each checkpoint tensor holds, by reverting a probe tensor whose rows carry their own
index. A `Piece` then says: checkpoint tensor `key` is rows `rows` of parameter `param` (viewed as (-1, last dim)).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from peftctl.errors import PeftctlError

FULL_PROBE_LIMIT = 1 << 26  # elements; a conversion that moves the last dimension is probed element by element


@dataclass
class Piece:
    key: str  # checkpoint tensor
    param: str  # model parameter (its name in the model, `.base_layer.` removed)
    rows: object = None  # LongTensor of the parameter's rows (as (-1, last dim)) in checkpoint order; None: all, as is
    elements: object = None  # LongTensor of flat element indices, for conversions that move the last dimension


def checkpoint_layout(model, checkpoint_meta, params: dict | None = None, *, strict: bool = True
                      ) -> dict[str, list[Piece]]:
    """model parameter name -> the checkpoint tensors that hold it (checkpoint_meta: SafetensorsFolder.meta, key ->
    (dtype code, shape)). Raises when one cannot be found.

    strict=False leaves out the parameters it cannot find (the merge then refuses only an adapter that changes one).
    params: parameter name -> shape, when not the model's own (peft's wrapped layers, `.base_layer.` removed)."""
    keys = dict(checkpoint_meta)  # key -> (dtype code, shape)
    tied = tied_keys(model)
    layout: dict[str, list[Piece]] = {}
    unresolved: dict[str, tuple[int, ...]] = {}
    if params is None:
        params = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    for name, shape in params.items():
        if name in keys:
            layout[name] = [Piece(name, name)]
        elif tied.get(name) in keys:
            layout[name] = [Piece(tied[name], name)]
        else:
            unresolved[name] = tuple(shape)
    for name, shape in unresolved.items():
        pieces = _converted(model, name, shape, keys)
        if not pieces and not strict:
            continue
        if not pieces:
            raise PeftctlError(f"the checkpoint has no tensor for the model's parameter {name} (its names differ from "
                               "what this version of transformers maps)",
                               hint="merge with peft (PeftModel.from_pretrained(...).merge_and_unload())")
        layout[name] = pieces
    return layout


def tied_keys(model) -> dict[str, str]:
    """output-embedding weight -> input-embedding weight, when the checkpoint stores them once."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or id(out) not in names or id(emb) not in names:
        return {}
    out_name, emb_name = (re.sub(r"\.base_layer$", "", names[id(m)]) for m in (out, emb))
    return {f"{out_name}.weight": f"{emb_name}.weight"}


def _converted(model, name: str, shape: tuple[int, ...], keys: dict) -> list[Piece]:
    """The checkpoint tensors transformers' reverse conversion makes of parameter `name`, with the rows they hold."""
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversions stores every parameter under its own name
        return []
    last = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    probe = torch.arange(rows, dtype=torch.int64).reshape(*(shape[:-1] if len(shape) > 1 else (1,)), 1)
    try:
        reverted = revert_weight_conversion(model, {name: probe})
    except Exception:  # noqa: BLE001 - a conversion that needs the real last dimension: probe every element
        reverted = None
    if reverted is not None and all(_holds_rows(keys.get(k), t, last) for k, t in reverted.items()):
        # (some transformers versions squeeze the probe's last dimension away: count elements, not shapes)
        return [Piece(key, name, rows=t.reshape(-1).clone()) for key, t in reverted.items()]
    if math.prod(shape) > FULL_PROBE_LIMIT:
        return []
    probe = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    try:
        reverted = revert_weight_conversion(model, {name: probe})
    except Exception:  # noqa: BLE001
        return []
    if not all(k in keys and math.prod(keys[k][1]) == t.numel() for k, t in reverted.items()):
        return []
    return [Piece(key, name, elements=t.clone()) for key, t in reverted.items()]


def _holds_rows(entry, piece, last: int) -> bool:
    """The checkpoint tensor (dtype code, shape) is whole rows of the parameter: its last dimension is the
    parameter's and it has as many rows as the reverted probe has entries."""
    if entry is None:
        return False
    shape = tuple(entry[1])
    return bool(shape) and shape[-1] == last and math.prod(shape[:-1]) == piece.numel()


def assemble(shape: tuple[int, ...], pieces: list[Piece], tensors: dict):
    """The parameter of `shape` from its checkpoint tensors (float32)."""
    import torch

    if len(pieces) == 1 and pieces[0].rows is None and pieces[0].elements is None:
        return tensors[pieces[0].key].float()
    device = tensors[pieces[0].key].device
    out = torch.empty(shape, dtype=torch.float32, device=device)
    for piece in pieces:
        tensor = tensors[piece.key].float()
        if piece.elements is not None:
            out.view(-1)[piece.elements.reshape(-1).to(device)] = tensor.reshape(-1)
        else:
            out.view(-1, shape[-1])[piece.rows.to(device)] = tensor.reshape(-1, shape[-1])
    return out
