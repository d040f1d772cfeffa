"""An adapter folder as peftctl writes it (RUN/adapter), and finding one in what the user names.

Beside the method's own files (peft's adapter_config.json, or the bottleneck adapter's bottleneck_config.json)
training writes ADAPTER_INFO: what peft's format cannot say -- the base model and revision, its dtype and
quantisation, the prompt format. merge, eval and generate read it back here. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InvalidInput

ADAPTER_INFO = "peftctl_adapter.json"
ADAPTER_FILES = ("adapter_config.json", "bottleneck_config.json")  # one of them marks an adapter folder


def is_adapter(path: Path) -> bool:
    return any((path / name).exists() for name in ADAPTER_FILES)


def adapter_in(path: Path) -> Path | None:
    """RUN/ or RUN/adapter -> the adapter folder; None when `path` is neither (a model folder, say). A run folder
    whose training has not saved an adapter yet is refused with the next step."""
    if is_adapter(path):
        return path
    if (path / "adapter").is_dir() and is_adapter(path / "adapter"):
        return path / "adapter"
    if (path / "run.json").exists() and not (path / "config.json").exists():
        raise InvalidInput(f"{path}: this run has no adapter yet (training did not finish)",
                           hint="finish or resume the run first: peftctl train RECIPE --resume auto")
    return None


def read_info(adapter_dir: Path) -> dict:
    """ADAPTER_INFO of an adapter folder; {} for an adapter peftctl did not train."""
    path = adapter_dir / ADAPTER_INFO
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: damaged ({e})") from None


@dataclass(frozen=True)
class TrainedOn:
    """The base an adapter was trained on, as ADAPTER_INFO (or peft's adapter_config.json) records it."""

    name: str
    revision: str | None
    dtype: str
    quantization: dict | None  # the recipe's quantization section, None for an unquantised base
    recorded_remote_code: bool  # only words a refusal: a downloaded adapter never switches remote code on


def trained_on(adapter_dir: Path, config: dict, *, hint: str) -> TrainedOn:
    """The base of an adapter, for generate and eval; `hint` says what to do when the adapter does not name it."""
    info = read_info(adapter_dir)
    name = info.get("base_model") or config.get("base_model_name_or_path")
    if not name:
        raise InvalidInput(f"{adapter_dir}: the adapter does not say which base model it was trained on", hint=hint)
    return TrainedOn(name, info.get("revision"), info.get("dtype") or "auto", info.get("quantization"),
                     info.get("trust_remote_code") is True)
