"""The adapter as deltas on checkpoint tensors, and the arithmetic that folds them in (always in float32)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.merge.safetensors_io import SafetensorsFolder


@dataclass
class Delta:
    """What one adapter does to one checkpoint tensor (to some rows of a model parameter, when the checkpoint
    stores that parameter in pieces)."""

    kind: str  # lora | dora | ia3 | ia3_bias
    fan_in_fan_out: bool = False
    scale: float = 1.0
    a: object = None  # (r, in); experts: (experts x r, in)
    b: object = None  # (out, r); experts: (out, r x experts)
    magnitude: object = None  # (out,)
    vector: object = None  # IA3: (1, in) feed-forward, (out, 1) otherwise
    feedforward: bool = False
    experts: int = 0  # > 0: a LoRA on a 3-D expert parameter (peft's target_parameters)
    transposed: bool = False  # experts stored (experts, in, out) rather than (experts, out, in)
    param_shape: tuple = ()
    rows: object = None  # the parameter's rows (as (-1, last dim)) this checkpoint tensor holds; None: all of it


def collect_deltas(adapter_dir: Path, method: str, config: dict, base: SafetensorsFolder, layout: dict | None = None,
                targets: dict | None = None) -> dict[str, list[Delta]]:
    """checkpoint key -> its deltas; every adapter tensor must find a base tensor of a fitting shape.

    layout: model parameter -> its checkpoint pieces (layout.checkpoint_layout; None: every name as is);
    targets: saved module path -> (parameter name, its shape, stored transposed) for peft's parameter targets."""
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise InvalidInput(f"{adapter_dir}: no adapter_model.safetensors",
                           hint="an adapter folder holds adapter_config.json and adapter_model.safetensors")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise InvalidInput(f"{weights}: damaged adapter weights ({e})") from None
    if not state:
        raise InvalidInput(f"{weights}: the adapter holds no tensors")
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|ia3_l)",
                             key)
        if not match:
            raise InvalidInput(f"{weights}: tensor {key} is of a kind peftctl merge does not fold",
                               hint="merge it with peft (PeftModel.from_pretrained(...).merge_and_unload())")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    targets = targets or {}
    deltas: dict[str, list[Delta]] = {}
    for module, parts in modules.items():
        if module in targets:
            param, shape, transposed = targets[module]
            new = [_expert_delta(module, parts, config, shape, transposed, param)]
            new[0].param_shape = shape
            params = [param]
        else:
            param = f"{module}.weight"
            if not _known(param, layout, base):
                raise InvalidInput(f"the base has no tensor {param}, which the adapter changes",
                                   hint="check that --base is the model the adapter was trained on")
            if method == "ia3":
                new = _ia3_deltas(module, parts, config, fan_in_fan_out, layout, base)
            else:
                new = [_lora_delta(module, parts, config, fan_in_fan_out)]
            params = [param if d.kind != "ia3_bias" else f"{module}.bias" for d in new]
        for delta, param in zip(new, params):
            for key, rows in _pieces(param, layout, base):
                if rows is not None and delta.kind not in ("lora",) and not delta.experts:
                    raise InvalidInput(f"{adapter_dir}: the base stores {param} in pieces; peftctl merges only LoRA "
                                       "deltas into such tensors", hint="merge it with peft (PeftModel.from_pretrained"
                                       "(...).merge_and_unload())")
                piece = replace(delta, rows=rows)
                if not delta.experts:
                    shape = tuple(base.shape(key)) if rows is None else (len(rows), base.shape(key)[-1])
                    _check_shape(key, piece, shape, adapter_dir)
                deltas.setdefault(key, []).append(piece)
    return deltas


def _known(param: str, layout: dict | None, base: SafetensorsFolder) -> bool:
    return param in layout if layout is not None else param in base.meta


def _pieces(param: str, layout: dict | None, base: SafetensorsFolder):
    """(checkpoint key, rows or None) for each checkpoint tensor that holds `param`."""
    if layout is None:
        return [(param, None)]
    out = []
    for piece in layout[param]:
        if piece.elements is not None:
            raise InvalidInput(f"the base stores {param} in a layout peftctl merge cannot fold into",
                               hint="merge it with peft (PeftModel.from_pretrained(...).merge_and_unload())")
        rows = piece.rows
        if rows is not None and len(rows) == math.prod(base.shape(piece.key)[:-1] or (1,)) and \
                bool((rows == rows.new_tensor(range(len(rows)))).all()) and len(layout[param]) == 1:
            rows = None  # only renamed: the whole parameter, in order
        out.append((piece.key, rows))
    return out


def _expert_delta(module: str, parts: dict, config: dict, shape: tuple, transposed: bool, param: str) -> Delta:
    """peft's ParamWrapper on a parameter: A (experts x r, in), B (out, r x experts); `shape` is the parameter's.
    peft matches alpha_pattern against the parameter's name (it doubles r and alpha for fused gate_up_proj)."""
    delta = _lora_delta(module, parts, config, False, check=False, pattern_name=param)
    a, b = delta.a, delta.b
    experts = shape[0] if len(shape) == 3 else 1
    r = a.shape[0] // experts if experts and a.shape[0] % experts == 0 else 0
    if len(shape) == 3:
        # (experts, out, in) unless the module says it stores (experts, in, out)
        want = (shape[1], shape[2]) if not transposed else (shape[2], shape[1])
    else:
        want = tuple(shape)
    if not r or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != want:
        raise InvalidInput(f"the base's {module} parameter has shape {list(shape)}, which does not fit the adapter's "
                           f"lora_A {list(a.shape)} and lora_B {list(b.shape)}",
                           hint="check that --base is the model the adapter was trained on")
    alpha_scale = delta.scale * a.shape[0] / r if not config.get("use_rslora") else \
        delta.scale * math.sqrt(a.shape[0]) / math.sqrt(r)  # the scale follows the per-expert rank
    return Delta(kind="lora", scale=alpha_scale, a=a, b=b, experts=experts, transposed=transposed and len(shape) == 3)


def _lora_delta(module: str, parts: dict, config: dict, fan_in_fan_out: bool, check: bool = True,
                pattern_name: str | None = None) -> Delta:
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        missing = "lora_A" if "lora_A.weight" not in parts else "lora_B"
        raise InvalidInput(f"damaged adapter: {module} has no {missing} tensor")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if check and (a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]):
        raise InvalidInput(f"damaged adapter: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}")
    r = a.shape[0]
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", pattern_name or module):  # peft's get_pattern_key: first match wins
            alpha = value
            break
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = parts.get("lora_magnitude_vector")
    if config.get("use_dora") and magnitude is None:
        raise InvalidInput(f"damaged adapter: the DoRA adapter has no magnitude vector for {module}")
    return Delta(kind="dora" if magnitude is not None else "lora", fan_in_fan_out=fan_in_fan_out, scale=scale,
                 a=a, b=b, magnitude=magnitude)


def _ia3_deltas(module: str, parts: dict, config: dict, fan_in_fan_out: bool, layout: dict | None,
                base: SafetensorsFolder) -> list[Delta]:
    vector = parts.get("ia3_l")
    if vector is None:
        raise InvalidInput(f"damaged adapter: {module} has no ia3_l tensor")
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_ff = re.fullmatch(feedforward, module) is not None
    else:
        is_ff = any(module == name or module.endswith(f".{name}") for name in feedforward)
    deltas = [Delta(kind="ia3", fan_in_fan_out=fan_in_fan_out, vector=vector, feedforward=is_ff)]
    if not is_ff and _known(f"{module}.bias", layout, base):
        deltas.append(Delta(kind="ia3_bias", vector=vector))
    return deltas


def _check_shape(key: str, delta: Delta, shape: tuple, adapter_dir: Path) -> None:
    if delta.kind == "ia3_bias":
        ok = shape == (delta.vector.shape[0],)
        wanted = f"({delta.vector.shape[0]},)"
    elif len(shape) != 2:
        ok, wanted = False, "a matrix"
    else:
        out_in = shape[::-1] if delta.fan_in_fan_out else shape
        if delta.kind == "ia3":
            want = (1, out_in[1]) if delta.feedforward else (out_in[0], 1)
            ok = tuple(delta.vector.shape) == want
            wanted = f"ia3_l {list(delta.vector.shape)}, {'feed-forward' if delta.feedforward else 'not feed-forward'}"
        else:
            want = (delta.b.shape[0], delta.a.shape[1])
            ok = tuple(out_in) == want and (delta.magnitude is None or delta.magnitude.shape == (want[0],))
            wanted = f"(out, in) = {list(want)}"
    if not ok:
        raise InvalidInput(f"the base's {key} has shape {list(shape)}, which does not fit the adapter in "
                           f"{adapter_dir} ({wanted})", hint="check that --base is the model the adapter was "
                           "trained on")


def apply_deltas(tensor, deltas: list[Delta]):
    """The merged tensor, computed in float32 on the tensor's device (the deltas must be there too)."""
    import torch

    w = tensor.float()
    for d in deltas:
        if d.rows is not None or d.experts:
            w = _apply_to_rows(w, d)
            continue
        if d.kind == "ia3_bias":
            w = w * d.vector.reshape(-1)
            continue
        w = w.T if d.fan_in_fan_out else w  # every formula below sees (out, in)
        if d.kind == "ia3":
            w = w * d.vector
        else:
            w = torch.addmm(w, d.b, d.a, alpha=d.scale)  # W + s * B @ A with one output allocation
            if d.kind == "dora":
                w = (d.magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1) * w
        w = w.T if d.fan_in_fan_out else w
    return w.contiguous()


def _apply_to_rows(w, d: Delta):
    """A LoRA delta on the rows `d.rows` of a parameter (all of it when None) that the checkpoint stores in pieces;
    for experts, row k of the (experts x d1, d2) view is row k % d1 of expert k // d1, whose delta is peft's
    ParamWrapper's: B_e @ A_e, transposed for experts stored (experts, in, out)."""
    import torch

    flat = w.reshape(-1, w.shape[-1])
    rows = d.rows.to(w.device) if d.rows is not None else torch.arange(flat.shape[0], device=w.device)
    if not d.experts:
        return torch.addmm(flat, d.b[rows], d.a, alpha=d.scale).reshape(w.shape)
    per_expert = d.param_shape[1] if len(d.param_shape) == 3 else d.param_shape[0]
    a = d.a.reshape(d.experts, -1, d.a.shape[-1])  # (experts, r, in)
    b = d.b.reshape(d.b.shape[0], -1, d.experts)  # (out, r, experts)
    out = flat.clone()
    expert_of, within = rows // per_expert, rows % per_expert
    for e in torch.unique(expert_of).tolist():
        mine = expert_of == e
        left, right = (b[:, :, e], a[e]) if not d.transposed else (a[e].T, b[:, :, e].T)
        out[mine] += d.scale * (left[within[mine]] @ right)
    return out.reshape(w.shape)


def deltas_to(deltas: dict[str, list[Delta]], device) -> dict[str, list[Delta]]:
    """The same deltas with their tensors on `device` (moved once, not per merged tensor)."""
    moved = {}
    for key, items in deltas.items():
        moved[key] = [replace(d, **{name: getattr(d, name).to(device) for name in ("a", "b", "magnitude", "vector")
                                    if getattr(d, name) is not None}) for d in items]
    return moved
