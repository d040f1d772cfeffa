"""Attach, save and load any method: peft-backed methods share peft's code; the bottleneck adapter has its own.

An adapter folder says what it is: peft's adapter_config.json, or our bottleneck_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.methods import adapter as bottleneck_method
from peftctl.methods import peft_common
from peftctl.methods.registry import METHODS, MethodSpec

PEFT_TYPE_TO_METHOD = {"LORA": "lora", "PREFIX_TUNING": "prefix_tuning", "PROMPT_TUNING": "prompt_tuning",
                       "P_TUNING": "p_tuning", "IA3": "ia3"}


def attach(model, section, context: peft_common.AttachContext):
    spec = METHODS[section.name]
    impl = spec.implementation()
    if spec.peft_type:
        return peft_common.attach(model, impl.peft_config(section, model.config, context), context)
    return impl.attach(model, section, context)


def save(model, spec: MethodSpec, out_dir: Path) -> None:
    if spec.peft_type:
        peft_common.save(model, out_dir)
    else:
        spec.implementation().save(model, out_dir)


def adapter_kind(adapter_dir: Path) -> tuple[str, dict]:
    """(method name, adapter config) of an adapter folder; InvalidInput when it is none."""
    adapter_dir = Path(adapter_dir)
    ours = adapter_dir / bottleneck_method.CONFIG_FILE
    theirs = adapter_dir / "adapter_config.json"
    try:
        if ours.exists():
            return "adapter", json.loads(ours.read_text())
        if theirs.exists():
            config = json.loads(theirs.read_text())
            return PEFT_TYPE_TO_METHOD.get(config.get("peft_type"), str(config.get("peft_type"))), config
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{adapter_dir}: damaged adapter config ({e})") from None
    if not adapter_dir.exists():
        raise InvalidInput(f"{adapter_dir}: no such adapter folder")
    raise InvalidInput(f"{adapter_dir}: not an adapter folder (no adapter_config.json or "
                       f"{bottleneck_method.CONFIG_FILE})", hint="pass RUN/adapter, or a run folder")


def base_model_of(adapter_dir: Path) -> str | None:
    return adapter_kind(adapter_dir)[1].get("base_model_name_or_path")


def load(base_model, adapter_dir: Path, *, trainable: bool = False):
    method, _ = adapter_kind(adapter_dir)
    if method == "adapter":
        return bottleneck_method.load(base_model, adapter_dir, trainable=trainable)
    return peft_common.load(base_model, adapter_dir, trainable=trainable)
