"""Bottleneck adapters (Houlsby, Pfeiffer), the recipe method `adapter`: small down-project / activate / up-project
blocks with a residual. The torch layers are in bottleneck_layers.py.

peft has no bottleneck adapter, so this one is ours: saved as safetensors plus a JSON config, loaded back by
peftctl, never merged (the activation makes it non-linear).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection


class AdapterSection(MethodSection):
    name: Literal["adapter"] = Field(description="The PEFT method.")
    placement: Literal["houlsby", "pfeiffer"] = Field("pfeiffer", description="houlsby: an adapter after the "
                                                      "attention block and one after the feed-forward block of "
                                                      "every layer; pfeiffer: after the feed-forward block only.")
    bottleneck: int | None = Field(None, ge=1, description="Width of the bottleneck (exclusive with "
                                   "reduction_factor).")
    reduction_factor: int | None = Field(None, ge=1, description="Bottleneck width as hidden_size / factor "
                                         "(default 16 when neither is given).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Non-linearity between the "
                                                                "down and up projections.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the adapter.")

    def problems(self) -> list[tuple[tuple, str]]:
        if self.bottleneck is not None and self.reduction_factor is not None:
            return [(("reduction_factor",), "give bottleneck or reduction_factor, not both")]
        return []

    def width(self, hidden_size: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, hidden_size // (self.reduction_factor or 16))


SPEC = MethodSpec(
    name="adapter",
    section=AdapterSection,
    updates="bottleneck blocks after attention and/or feed-forward",
    peft_type=None,
    cannot_merge="a bottleneck adapter is a non-linear block (down-projection, activation, up-projection); "
                 "it cannot be folded into the linear weights of the base model",
    instead_of_merge="load it with its base through peftctl (`peftctl generate RUN/adapter`)",
)


CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
FORMAT_VERSION = 1


def attach(model, section: AdapterSection, context=None):
    from peftctl.methods import bottleneck_layers

    width = section.width(bottleneck_layers.hidden_size(model.config))
    bottleneck_layers.attach(model, section.placement, width, section.activation, section.dropout)
    model.peftctl_adapter_config = {
        "method": "adapter", "format_version": FORMAT_VERSION, "placement": section.placement, "width": width,
        "activation": section.activation, "dropout": section.dropout,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
    }
    return model


def save(model, out_dir, *, state_dict: dict | None = None) -> None:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:  # full tensors gathered from shards: keep ours, named as in the adapters' module
        prefix = "bottleneck_adapters."
        state = {k.split(prefix, 1)[1]: v.contiguous() for k, v in state_dict.items() if prefix in k}
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.bottleneck_adapters.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "peftctl_method": "adapter"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.peftctl_adapter_config, indent=2) + "\n")


def load(base_model, adapter_dir, *, trainable: bool = False):
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from peftctl.errors import InvalidInput

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if config.get("format_version", 1) > FORMAT_VERSION:
        raise InvalidInput(f"{adapter_dir}: bottleneck adapter format {config['format_version']} is newer than "
                           f"this peftctl reads ({FORMAT_VERSION})", hint="upgrade peftctl")
    if not (adapter_dir / WEIGHTS_FILE).exists():
        raise InvalidInput(f"{adapter_dir}: no {WEIGHTS_FILE}",
                           hint=f"a bottleneck adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:  # read before attaching: a damaged file leaves the base model untouched
        state = load_file(str(adapter_dir / WEIGHTS_FILE), device="cpu")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt file
        raise InvalidInput(f"{adapter_dir / WEIGHTS_FILE}: damaged adapter weights ({e})") from e
    section = AdapterSection(name="adapter", placement=config["placement"], bottleneck=config["width"],
                             activation=config["activation"], dropout=config["dropout"])
    model = attach(base_model, section)
    hint = "check that --base is the model the adapter was trained on"
    try:
        result = model.bottleneck_adapters.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that differs: another hidden size
        raise InvalidInput(f"{adapter_dir}: the adapter does not fit this base model "
                           f"({str(e).splitlines()[-1].strip()})", hint=hint) from None
    if result.missing_keys or result.unexpected_keys:
        raise InvalidInput(f"{adapter_dir}: the adapter does not fit this base model (missing: "
                           f"{result.missing_keys[:3]}, unexpected: {result.unexpected_keys[:3]})", hint=hint)
    for p in model.bottleneck_adapters.parameters():
        p.requires_grad_(trainable)
    return model
