"""Parameter counts, the same way peft counts them, for a real model or one built on the meta device.

`count-params` reads the model's config.json alone, builds the model on the meta device (shapes, no storage) and
attaches the recipe's adapter there too, so a 70B configuration counts in seconds and nothing is downloaded but the
config. peft reports a 4-bit weight (packed two to a byte) as its full out x in size; a meta model that is not
quantised has that size already, so plain numel there gives exactly what `train` prints for a 4-bit run. Never
quantise the meta model: its packed weights would then be counted as peft counts real ones, 8x over.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftctl.errors import InvalidInput, ModelNotFound, PeftctlError, first_line, hub_failure
from peftctl.methods.moe import unit_name


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        """peft's own wording, so the figures can be compared with print_trainable_parameters()."""
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")


def count_parameters(model) -> ParamCount:
    """peft's `get_nb_trainable_parameters`, for any module (ours included): each shared tensor once, a packed
    4-bit weight counted as the weights it holds."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):
            n = p.ds_numel
        if p.__class__.__name__ == "Params4bit" and p.device.type != "meta":
            n *= 2 * p.element_size()  # packed storage: two 4-bit values per byte
        total += n
        if p.requires_grad:
            trainable += n
    # a frozen input embedding kept in host memory (train/host_embedding.py) is no parameter, yet part of the model
    total += sum(t.numel() for m in model.modules() if hasattr(m, "host_parameters") for t in m.host_parameters())
    return ParamCount(trainable, total)


# --- the model's config, and the model on the meta device ----------------------------------------------------

def read_config(model_section):
    """The model's config from its config.json alone: a local folder, or that one file from the hub (cached).

    A hub model with trust_remote_code needs its configuration code too; transformers fetches it with the config.
    """
    from peftctl.hub import is_local

    name, revision = model_section.name, model_section.revision
    if is_local(name):
        folder = Path(name)
        if not folder.is_dir():
            raise ModelNotFound(f"model {name}: no such folder",
                                hint="check model.name: a hub id (org/name) or a folder that holds config.json")
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"{name}: not a model folder (no config.json)",
                                hint="point model.name at the folder that holds config.json")
        return _parse_config(folder, name, model_section.trust_remote_code)
    if model_section.trust_remote_code:
        from transformers import AutoConfig

        from peftctl.model import from_pretrained

        return from_pretrained(AutoConfig.from_pretrained, name, "model", revision=revision,
                                trust_remote_code=True)
    return _parse_config(Path(_hub_config_file(name, revision)).parent, name, False)


def _hub_config_file(repo_id: str, revision: str | None) -> str:
    """hf_hub_download of config.json alone, its failures turned into messages that say what was tried."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as e:  # noqa: BLE001 - classified below; the rest goes up unchanged
        kind, text = hub_failure(e), first_line(e)
        at = f"{repo_id}" + (f" at revision {revision}" if revision else "")
        if kind == "gated":
            raise ModelNotFound(f"{at} is gated: {text}", hint="accept its licence on the hub, then "
                                "`hf auth login`") from e
        if kind == "missing":
            raise ModelNotFound(f"model {at} not found on the hub: {text}",
                                hint="check model.name and model.revision; a private model needs `hf auth login`; "
                                "a local folder must exist (relative paths start from the recipe's folder)") from e
        if kind == "not_cached":
            offline = bool(os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0", "false"))
            tried = (f"a local folder named {repo_id!r} (there is none), then config.json of the hub model {at} in "
                     f"the hub cache ({_hub_cache()}), which does not hold it")
            if offline:
                raise ModelNotFound(f"model {repo_id} not found; tried {tried}, and not the hub itself: "
                                    "HF_HUB_OFFLINE is set",
                                    hint="unset HF_HUB_OFFLINE to fetch config.json (a few KB), or give a local "
                                    "model folder") from e
            raise PeftctlError(f"could not reach the hub for {at}; tried {tried}, and the hub: {text}",
                               hint="check the network (or HF_ENDPOINT), or give a local model folder") from e
        if kind == "missing_file":
            raise ModelNotFound(f"the hub model {at} has no config.json: {text}",
                                hint="is it a model repository (not a dataset or an adapter)?") from e
        raise


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - only for a message
        return "HF_HOME/hub"


def _parse_config(folder: Path, name: str, trust_remote_code: bool):
    import json

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"config.json of {name} is not valid JSON ({e})") from None
    except (ValueError, KeyError, OSError) as e:  # transformers reports a config it cannot parse as OSError
        text = first_line(e)
        raise InvalidInput(f"config.json of {name} cannot be read by transformers: {text}",
                           hint="check its model_type; a new architecture may need a newer transformers, a custom "
                           "one model.trust_remote_code: true") from None


def meta_model(config, *, trust_remote_code: bool = False):
    """The model's modules with no storage: seconds even for 70B, and no weights downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        text = first_line(e)
        raise InvalidInput(f"{getattr(config, 'model_type', 'this model')}: not a causal language model that "
                           f"transformers can build ({text})",
                           hint="peftctl trains causal LMs (AutoModelForCausalLM)") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach_on_meta(model, section, *, tokenizer_path: str = "", where: str = ""):
    """The recipe's adapter on a meta model, built on the meta device as well (peft would otherwise create and
    initialise every adapter tensor on the CPU first: hundreds of MB and ~10 s for LoRA on every layer of 70B)."""
    import torch

    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext

    if getattr(section, "prompt_init_text", None):
        # Initialising from text changes values, not sizes; counting needs no tokenizer.
        section = section.model_copy(update={"prompt_init_text": None})
    check_targets(model, section, where)
    with torch.device("meta"):
        return runtime.attach(model, section, AttachContext(tokenizer_path=tokenizer_path, where=where))


def check_targets(model, section, where: str = "") -> None:
    """Every name in method.targets must match a module (peft only refuses a list where none matches, and
    silently skips the others). Matching is peft's: the whole module path or its last parts."""
    from peftctl.methods import moe
    from peftctl.model import linear_layer_names

    targets = getattr(section, "targets", None)
    if not isinstance(targets, list):
        return
    names = [name for name, _ in model.named_modules() if name]
    names += moe.expert_parameters(model)  # fused MoE experts (methods/moe.py)
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        prefix = f"{where}: " if where else ""
        which = ", ".join(unmatched)
        raise InvalidInput(f"{prefix}method.targets: {which} match{'es' if len(unmatched) == 1 else ''} no module "
                           f"of this model ({getattr(model.config, 'model_type', '?')})",
                           hint=f"linear layers of this model: {', '.join(linear_layer_names(model))}"
                           f"{_expert_hint(model)} (or targets: all-linear)")


def _expert_hint(model) -> str:
    from peftctl.methods.moe import targets_param_names

    names = targets_param_names(model)
    return f"; expert tensors and routers: {', '.join(names)}" if names else ""


# --- what a recipe trains ------------------------------------------------------------------------------------

@dataclass
class RecipeCount:
    count: ParamCount
    modules: list[dict]  # one row per adapted module kind: layers matched, features, tensors, parameters
    model: object = field(default=None, repr=False)  # the meta model with its adapter (for the memory plan)
    config: object = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"trainable": self.count.trainable, "total": self.count.total,
                "percent": round(self.count.percent, 6), "line": self.count.line(), "modules": self.modules}


def count_for_recipe(recipe, config=None, *, where: str = "") -> RecipeCount:
    """What `train` will print for this recipe, from the model's config alone. `where` cites method.targets in
    errors (LoadedRecipe.where('method.targets'))."""
    config = config or read_config(recipe.model)
    model = meta_model(config, trust_remote_code=recipe.model.trust_remote_code)
    model = attach_on_meta(model, recipe.method, tokenizer_path=recipe.model.name, where=where)
    return RecipeCount(count_parameters(model), trainable_modules(model), model=model, config=config)


_SPOT_NAMES = {"attn": "attention", "ffn": "feed-forward"}


def trainable_modules(model) -> list[dict]:
    """The trained parameters, one row per kind of adapted module, in model order.

    A row: `module` (the shortest unambiguous name: q_proj; attn.c_proj beside mlp.c_proj), `layers` (how many
    modules it matched), `in_features`/`out_features` of the adapted layer, `tensors` (name -> shape of one
    instance), `parameters_each` (None where instances differ) and `parameters` (all of them).
    """
    units: dict[str, dict] = {}  # one adapted module (or prompt encoder, or bottleneck block) -> its tensors
    claimed: set[str] = set()
    for name, module in model.named_modules():
        if is_tuner_layer(module):
            tensors = {_tensor_label(pname): tuple(p.shape) for pname, p in module.named_parameters()
                       if p.requires_grad and not pname.startswith("base_layer.")}
            if tensors:
                units[unit_name(name, module)] = {"tensors": tensors, "in": getattr(module, "in_features", None),
                                                   "out": getattr(module, "out_features", None)}
                claimed |= {f"{name}.{pname}" for pname, _ in module.named_parameters()}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in claimed:
            unit, label = _unit_of(name)
            units.setdefault(unit, {"tensors": {}, "in": None, "out": None})["tensors"][label] = tuple(p.shape)

    groups: dict[str, list[dict]] = {}
    for unit, info in units.items():
        groups.setdefault(_pattern(unit), []).append(info)
    display = _short_names(list(groups))
    rows = []
    for pattern, infos in groups.items():
        sizes = [sum(_numel(s) for s in info["tensors"].values()) for info in infos]
        same = len(set(sizes)) == 1 and len({tuple(sorted(i["tensors"].items())) for i in infos}) == 1
        first = infos[0]
        rows.append({"module": display[pattern], "path": pattern, "layers": len(infos),
                     "in_features": first["in"], "out_features": first["out"],
                     "tensors": {k: list(v) for k, v in first["tensors"].items()},
                     "parameters_each": sizes[0] if same else None, "parameters": sum(sizes)})
    return rows


def is_tuner_layer(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, BaseTunerLayer)


def _tensor_label(pname: str) -> str:
    """'lora_A.default.weight' -> 'lora_A'; 'ia3_l.default' -> 'ia3_l'; biases keep their suffix."""
    parts = [p for p in pname.split(".") if p != "default"]
    if parts and parts[-1] == "weight" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _unit_of(name: str) -> tuple[str, str]:
    """(the unit a trainable parameter belongs to, its label inside the unit) for parameters outside peft's
    tuner layers: the prompt encoder, our bottleneck blocks, anything else by its parent module."""
    parts = name.split(".")
    if "prompt_encoder" in parts:
        i = parts.index("prompt_encoder")
        return ".".join(parts[: i + 1]), _tensor_label(".".join(parts[i + 1:]))
    if "bottleneck_adapters" in parts:
        i = parts.index("bottleneck_adapters")
        return ".".join(parts[: i + 2]), _tensor_label(".".join(parts[i + 2:]))
    return ".".join(parts[:-1]) or name, parts[-1]


def _pattern(unit: str) -> str:
    """The unit's path with its layer index made a wildcard: 'model.layers.*.self_attn.q_proj'."""
    return ".".join("*" if p.isdigit() else re.sub(r"^\d+_", "*_", p) for p in unit.split("."))


def _short_names(patterns: list[str]) -> dict[str, str]:
    """The shortest trailing part of each pattern that tells it apart from the others."""
    def tail(pattern: str, n: int) -> str:
        parts = [p for p in pattern.split(".") if p != "*"]
        last = parts[-1]
        if last.startswith("*_"):  # our bottleneck blocks
            return f"adapter after {_SPOT_NAMES.get(last[2:], last[2:])}"
        for drop in ("base_model", "model", "default"):
            parts = [p for p in parts if p != drop] or parts
        return ".".join(parts[-n:])

    out = {}
    for pattern in patterns:
        n = 2 if pattern.split(".")[-2:-1] == ["experts"] else 1  # experts.down_proj, a tensor named with its module
        while n < 8 and sum(tail(other, n) == tail(pattern, n) for other in patterns) > 1:
            n += 1
        out[pattern] = tail(pattern, n)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
