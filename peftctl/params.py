"""Parameter counts, the same way peft counts them, for a real model or one built on the meta device.

peft reports a 4-bit weight (packed two to a byte) as its full out x in size; a meta model that is not quantised
has that size already, so counting plain numel there gives exactly what `train` prints for a 4-bit run.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    return ParamCount(trainable, total)


def meta_model(config, *, trust_remote_code: bool = False):
    """The model's modules with no storage: seconds even for 70B, and no weights downloaded."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class RecipeCount:
    count: ParamCount
    modules: list[dict]  # per adapted module name: layers matched, shape, parameters each, total

    def as_dict(self) -> dict:
        return {"trainable": self.count.trainable, "total": self.count.total,
                "percent": round(self.count.percent, 6), "line": self.count.line(), "modules": self.modules}


def count_for_recipe(recipe, config=None) -> RecipeCount:
    """What `train` will print for this recipe, from the model's config alone."""
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_config

    config = config or load_config(recipe.model)
    model = meta_model(config, trust_remote_code=recipe.model.trust_remote_code)
    section = recipe.method
    if getattr(section, "prompt_init_text", None):
        # Initialising from text changes values, not sizes; counting needs no tokenizer download.
        section = section.model_copy(update={"prompt_init_text": None})
    model = runtime.attach(model, section, AttachContext(tokenizer_path=recipe.model.name))
    return RecipeCount(count_parameters(model), trainable_modules(model))


def trainable_modules(model) -> list[dict]:
    """Trainable parameters grouped by the adapted module's last name (q_proj, prompt_encoder...)."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        owner = next((parts[i - 1] for i, part in enumerate(parts) if part.startswith(("lora_", "ia3_"))
                      and i > 0), None) or _owner_fallback(parts)
        module = ".".join(parts[:-1])
        group = groups.setdefault(owner, {"module": owner, "modules": set(), "parameters": 0, "shapes": set()})
        group["modules"].add(module.split(f".{owner}.")[0] if f".{owner}." in module else module)
        group["parameters"] += p.numel()
        group["shapes"].add(tuple(p.shape))
    out = []
    for group in groups.values():
        layers = len(group["modules"])
        out.append({"module": group["module"], "layers": layers, "parameters": group["parameters"],
                    "per_layer": group["parameters"] // max(1, layers),
                    "shapes": sorted("x".join(map(str, s)) for s in group["shapes"])})
    return sorted(out, key=lambda g: g["module"])


def _owner_fallback(parts: list[str]) -> str:
    for candidate in ("prompt_encoder", "bottleneck_adapters"):
        if candidate in parts:
            return candidate
    return parts[-2] if len(parts) > 1 else parts[-1]
