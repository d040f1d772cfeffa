"""Attach, save and load any method: peft-backed methods share peft's code; the bottleneck adapter has its own.

An adapter folder says what it is: peft's adapter_config.json, or our bottleneck_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.methods import bottleneck as bottleneck_method, peft_common
from peftctl.methods.registry import METHODS, MethodSpec

PEFT_TYPE_TO_METHOD = {"LORA": "lora", "PREFIX_TUNING": "prefix_tuning", "PROMPT_TUNING": "prompt_tuning",
                       "P_TUNING": "p_tuning", "IA3": "ia3"}


def attach(model, section, context: peft_common.AttachContext):
    spec = METHODS[section.name]
    impl = spec.implementation()
    if spec.peft_type:
        config, notes = impl.peft_config(section, model.config, context), []
        if hasattr(impl, "adapt_to_model"):  # LoRA on mixture-of-experts models
            config, notes = impl.adapt_to_model(model, section, config, context)
        model = peft_common.attach(model, config, context)
        if hasattr(impl, "after_attach"):
            notes += impl.after_attach(model, section)
        model.peftctl_notes = notes  # what the run should tell the user (train prints them)
        return model
    return impl.attach(model, section, context)


def save(model, spec: MethodSpec, out_dir: Path, *, state_dict: dict | None = None) -> None:
    """Write the adapter; `state_dict` (the full trainable tensors) stands in for the model's own when they are
    sharded across processes."""
    if spec.peft_type:
        peft_common.save(model, out_dir, state_dict=state_dict)
    else:
        spec.implementation().save(model, out_dir, state_dict=state_dict)


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


MAX_SIZE = 1 << 16  # no rank, width or token count of a real adapter comes near; 10**9 would allocate terabytes
SIZE_KEYS = ("r", "num_virtual_tokens", "encoder_hidden_size", "token_dim", "width", "num_transformer_submodules",
             "num_attention_heads", "num_layers")
BOTTLENECK_KEYS = ("placement", "width", "activation", "dropout")


def load(base_model, adapter_dir: Path, *, trainable: bool = False):
    method, config = adapter_kind(adapter_dir)
    check_config(Path(adapter_dir), method, config)  # before anything is allocated
    try:
        if method == "adapter":
            return bottleneck_method.load(base_model, adapter_dir, trainable=trainable)
        return peft_common.load(base_model, adapter_dir, trainable=trainable)
    except (KeyError, TypeError, ValueError) as e:  # peft/pydantic on a config that passed the checks above
        raise InvalidInput(f"{adapter_dir}: damaged adapter config ({type(e).__name__}: {e})",
                           hint="use the adapter folder as training wrote it") from None


def check_config(adapter_dir: Path, method: str, config: dict) -> None:
    """Refuse a damaged or hostile adapter config with a message, before it makes peft allocate anything."""
    where = adapter_dir / (bottleneck_method.CONFIG_FILE if method == "adapter" else "adapter_config.json")
    if method not in METHODS:
        raise InvalidInput(f"{where}: unknown adapter type {config.get('peft_type', method)!r}",
                           hint=f"peftctl loads {', '.join(sorted(PEFT_TYPE_TO_METHOD))} and its bottleneck adapters")
    if method == "adapter":
        missing = [key for key in BOTTLENECK_KEYS if key not in config]
        if missing:
            raise InvalidInput(f"{where}: damaged, no {', '.join(repr(k) for k in missing)}",
                               hint="use the adapter folder as training wrote it")
    sizes = {key: config.get(key) for key in SIZE_KEYS if config.get(key) is not None}
    for pattern in ("rank_pattern", "alpha_pattern"):
        if isinstance(config.get(pattern), dict):
            sizes.update({f"{pattern}.{k}": v for k, v in config[pattern].items()})
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SIZE:
            raise InvalidInput(f"{where}: {key} {value!r} is not a plausible size (1 to {MAX_SIZE})",
                               hint="the config is damaged; use the adapter folder as training wrote it")
    if method == "lora":
        _check_lora_ranks(adapter_dir, where, config)


def _check_lora_ranks(adapter_dir: Path, where: Path, config: dict) -> None:
    """The rank in the config must be the one the weights have (read from the safetensors header only)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return  # peft_common.load says so
    from safetensors import safe_open

    ranks = {config.get("r")} | set((config.get("rank_pattern") or {}).values())
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {f.get_slice(k).get_shape()[0] for k in f.keys() if ".lora_A." in k}
    except Exception:  # noqa: BLE001 - a damaged file: peft_common.load reports it
        return
    # peft's parameter wrapper (MoE expert tensors, target_parameters) stacks one rank-r factor per expert.
    stacked = bool(config.get("target_parameters"))
    odd = {n for n in found if not any(n == r or (stacked and r and n % r == 0) for r in ranks if r)}
    if odd:
        raise InvalidInput(f"{where}: r {config.get('r')} does not match the weights (rank {sorted(odd)[0]})",
                           hint="the config is damaged; use the adapter folder as training wrote it")


def initialise_from(model, section, adapter_dir) -> None:
    """method.init_from: copy an existing adapter's weights into the freshly attached one.

    The adapter must be of the same method with the same shapes (rank, targets, placement...); any difference is
    named. Works for our adapters and for any peft adapter trained on the same base.
    """
    import torch

    adapter_dir = Path(adapter_dir)
    method, config = adapter_kind(adapter_dir)
    wanted = "lora" if section.name == "qlora" else section.name
    where = f"method.init_from: {adapter_dir}"
    if method != wanted:
        raise InvalidInput(f"{where} holds a {method} adapter; this recipe trains {section.name}",
                           hint="start from an adapter of the same method, or remove method.init_from")
    differences = _setting_differences(section, config)
    if differences:
        raise InvalidInput(f"{where} does not fit the recipe: " + "; ".join(differences),
                           hint="set the recipe's method keys to the adapter's, or remove method.init_from")
    if method == "adapter":
        from safetensors.torch import load_file

        state = load_file(str(adapter_dir / bottleneck_method.WEIGHTS_FILE))
        target = model.bottleneck_adapters.state_dict()
    else:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise InvalidInput(f"{where}: no adapter_model.safetensors")
        state = load_file(str(weights))
        target = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    wrong = [k for k in set(target) & set(state) if tuple(target[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape "
                  f"(e.g. {(missing or unexpected or wrong)[0]})")
        raise InvalidInput(f"{where} does not fit this model: {detail}",
                           hint="it must come from the same base model and the same method settings")
    with torch.no_grad():
        if method == "adapter":
            model.bottleneck_adapters.load_state_dict(state)
        else:
            set_peft_model_state_dict(model, state)


def _setting_differences(section, config: dict) -> list[str]:
    """The recipe keys whose values differ from the adapter's own config (what a user can fix in the recipe)."""
    pairs = {
        "lora": [("r", "r"), ("use_dora", "use_dora"), ("use_rslora", "use_rslora"), ("alpha", "lora_alpha")],
        "ia3": [], "prefix_tuning": [("num_virtual_tokens", "num_virtual_tokens"), ("projection", "prefix_projection")],
        "prompt_tuning": [("num_virtual_tokens", "num_virtual_tokens")],
        "p_tuning": [("num_virtual_tokens", "num_virtual_tokens")],
        "adapter": [("placement", "placement")],
    }["lora" if section.name == "qlora" else section.name]
    out = []
    for ours, theirs in pairs:
        if theirs in config and getattr(section, ours) != config[theirs] and not (
                isinstance(config[theirs], (int, float)) and float(config[theirs]) == float(getattr(section, ours))):
            out.append(f"method.{ours} is {getattr(section, ours)!r}, the adapter's is {config[theirs]!r}")
    return out
