"""What every peft-backed method shares: attaching through `get_peft_model`, saving in peft's own format, and
loading strictly (peft only warns about a missing tensor; for us a partial adapter is an error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InvalidInput, first_line


@dataclass
class AttachContext:
    """What a method may need beyond its recipe section."""

    tokenizer_path: str  # model.name as the recipe gives it: for prompt tuning's init text, and the saved base name
    where: str = ""  # the recipe position of method.targets, for error messages
    tokenizer_revision: str | None = None  # model.revision: the tokenizer prompt tuning reads its init text with


def attach(model, peft_config, context: AttachContext):
    from peft import get_peft_model

    keep_int8_scales(model)
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:
        text = str(e)
        if "not found in the base model" in text or "Target module" in text or "target_modules" in text:
            from peftctl.model import linear_layer_names

            where = f"{context.where}: " if context.where else ""
            raise InvalidInput(f"{where}method.targets: {first_line(e)}",
                               hint=f"linear layers of this model: {', '.join(linear_layer_names(model))}") from None
        raise
    # peft records the folder the weights came from; the recipe's name is what llama.cpp's converter and the hub's
    # model cards read (a hub id stays a hub id, with its revision).
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = context.tokenizer_path or config.base_model_name_or_path
        config.revision = context.tokenizer_revision or config.revision
    return peft_model


def save(model, out_dir: Path, *, state_dict: dict | None = None) -> None:
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    _sort_target_modules(Path(out_dir) / "adapter_config.json")


def _sort_target_modules(path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes from run to run: sort it, so the same
    training writes the same file."""
    import json

    config = json.loads(path.read_text())
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load(base_model, adapter_dir: Path, *, trainable: bool = False):
    """Load a peft adapter onto `base_model`; any missing or unexpected tensor is an error."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if trainable:
        _check_trainable_reload(Path(adapter_dir))
    if not weights.exists():
        raise InvalidInput(f"{adapter_dir}: no adapter_model.safetensors",
                           hint="an adapter folder holds adapter_config.json and adapter_model.safetensors")
    try:
        stored = set(load_file(str(weights), device="cpu"))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise InvalidInput(f"{weights}: damaged adapter weights ({e})") from e
    keep_int8_scales(base_model)
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
    if not trainable:
        # peft leaves the prompt encoder of prompt-learning methods trainable even in inference mode
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _check_trainable_reload(adapter_dir: Path) -> None:
    """peft saves what p-tuning and projected prefix tuning produce (virtual-token embeddings, key/value states),
    not the encoder that produced them: such an adapter serves as it is, but training cannot continue from it."""
    import json

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # PeftModel.from_pretrained reports it
    kind = config.get("peft_type")
    if kind == "P_TUNING" or (kind == "PREFIX_TUNING" and config.get("prefix_projection")):
        what = "p-tuning" if kind == "P_TUNING" else "prefix tuning with a projection"
        raise InvalidInput(f"{adapter_dir}: a {what} adapter holds the virtual tokens its encoder produced, not the "
                           "encoder, so training cannot continue from it",
                           hint="continue the run from one of its checkpoints (peftctl train RECIPE --resume auto)")


def keep_int8_scales(model) -> None:
    """Keep the row scales of bitsandbytes 8-bit weights that peft replaces on the CPU (DoRA on an 8-bit base).

    The first forward pass of an 8-bit layer moves its int8 matrix and row scales from the weight to the layer's
    state. On the CPU, peft's DoRA then replaces the weight at every forward pass (`module.weight =
    module.weight.to(device)` in `dequantize_module_weight`), and that copy carries the matrix but not the scales;
    the next forward moves the pair to the state and the matmul fails on the missing scales (peft 0.21,
    bitsandbytes 0.50). A pre-hook puts the scales back on such a copy, so that forward moves the right pair; the
    values are those of the state, unchanged. On a GPU peft keeps the weight and the hook does nothing.
    """
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ == "Int8Params" and hasattr(module, "state"):
            if not getattr(module, "_peftctl_keeps_scales", False):
                module.register_forward_pre_hook(_restore_int8_scales)
                module._peftctl_keeps_scales = True


def _restore_int8_scales(module, args):
    weight, state = module.weight, module.state
    if weight.CB is not None and weight.SCB is None and state.SCB is not None:
        weight.SCB = state.SCB
