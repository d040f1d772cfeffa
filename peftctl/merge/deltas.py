"""The adapter as deltas on checkpoint tensors, and the arithmetic that folds them in (always in float32)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.merge.safetensors_io import Checkpoint


@dataclass
class Delta:
    """What one adapter does to one checkpoint tensor."""

    kind: str  # lora | dora | ia3 | ia3_bias
    fan_in_fan_out: bool = False
    scale: float = 1.0
    a: object = None  # (r, in)
    b: object = None  # (out, r)
    magnitude: object = None  # (out,)
    vector: object = None  # IA3: (1, in) feed-forward, (out, 1) otherwise
    feedforward: bool = False


def plan_deltas(adapter_dir: Path, method: str, config: dict, base: Checkpoint) -> dict[str, list[Delta]]:
    """checkpoint key -> its deltas; every adapter tensor must find a base tensor of a fitting shape."""
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
    deltas: dict[str, list[Delta]] = {}
    for module, parts in modules.items():
        key = f"{module}.weight"
        if key not in base.meta:
            raise InvalidInput(f"the base has no tensor {key}, which the adapter changes",
                               hint="check that --base is the model the adapter was trained on")
        if method == "ia3":
            new = _ia3_deltas(module, parts, config, fan_in_fan_out, base)
        else:
            new = [_lora_delta(module, parts, config, fan_in_fan_out)]
        for delta in new:
            target = key if delta.kind != "ia3_bias" else f"{module}.bias"
            _check_shape(target, delta, base.shape(target), adapter_dir)
            deltas.setdefault(target, []).append(delta)
    return deltas


def _lora_delta(module: str, parts: dict, config: dict, fan_in_fan_out: bool) -> Delta:
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        missing = "lora_A" if "lora_A.weight" not in parts else "lora_B"
        raise InvalidInput(f"damaged adapter: {module} has no {missing} tensor")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InvalidInput(f"damaged adapter: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}")
    r = a.shape[0]
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key: the first match wins
            alpha = value
            break
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = parts.get("lora_magnitude_vector")
    if config.get("use_dora") and magnitude is None:
        raise InvalidInput(f"damaged adapter: the DoRA adapter has no magnitude vector for {module}")
    return Delta(kind="dora" if magnitude is not None else "lora", fan_in_fan_out=fan_in_fan_out, scale=scale,
                 a=a, b=b, magnitude=magnitude)


def _ia3_deltas(module: str, parts: dict, config: dict, fan_in_fan_out: bool, base: Checkpoint) -> list[Delta]:
    vector = parts.get("ia3_l")
    if vector is None:
        raise InvalidInput(f"damaged adapter: {module} has no ia3_l tensor")
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_ff = re.fullmatch(feedforward, module) is not None
    else:
        is_ff = any(module == name or module.endswith(f".{name}") for name in feedforward)
    deltas = [Delta(kind="ia3", fan_in_fan_out=fan_in_fan_out, vector=vector, feedforward=is_ff)]
    if not is_ff and f"{module}.bias" in base.meta:
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
    """The merged tensor, computed in float32."""
    import torch

    w = tensor.float()
    for d in deltas:
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
