"""What every peft-backed method shares: attaching through `get_peft_model`, saving in peft's own format, and
loading strictly (peft only warns about a missing tensor; for us a partial adapter is an error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InvalidInput


@dataclass
class AttachContext:
    """What a method may need beyond its recipe section."""

    tokenizer_path: str  # for prompt tuning initialised from text
    where: str = ""  # the recipe position of method.targets, for error messages


def attach(model, peft_config, context: AttachContext):
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        text = str(e)
        if "not found in the base model" in text or "Target module" in text or "target_modules" in text:
            from peftctl.model import linear_layer_names

            where = f"{context.where}: " if context.where else ""
            raise InvalidInput(f"{where}method.targets: {text.splitlines()[0]}",
                               hint=f"linear layers of this model: {', '.join(linear_layer_names(model))}") from None
        raise


def save(model, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)


def load(base_model, adapter_dir: Path, *, trainable: bool = False):
    """Load a peft adapter onto `base_model`; any missing or unexpected tensor is an error."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.exists():
        raise InvalidInput(f"{adapter_dir}: no adapter_model.safetensors",
                           hint="an adapter folder holds adapter_config.json and adapter_model.safetensors")
    try:
        stored = set(load_file(str(weights), device="cpu"))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise InvalidInput(f"{weights}: damaged adapter weights ({e})") from e
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        raise InvalidInput(f"{adapter_dir}: the adapter does not fit this base model: {'; '.join(parts)}",
                           hint="check that --base is the model the adapter was trained on")
    return model
