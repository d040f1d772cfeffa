"""The layers of the bottleneck adapter method (bottleneck.py, the recipe method `adapter`): torch code, imported
only when it runs.

Adapters are attached with forward hooks on each decoder layer's attention and/or feed-forward block, so the base
model's own module names and state dict stay untouched; only the adapter weights are saved.
"""

from __future__ import annotations

import torch
from torch import nn

from peftctl.model import decoder_layers

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
FEEDFORWARD_NAMES = ("mlp", "feed_forward", "ffn")


class Bottleneck(nn.Module):
    """x -> x + up(act(down(x))); `up` starts at zero, so a new adapter leaves the model unchanged."""

    def __init__(self, hidden: int, width: int, activation: str, dropout: float):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, hidden)
        nn.init.normal_(self.down.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.dropout(self.act(self.down(x.to(self.down.weight.dtype)))))
        return x + h.to(x.dtype)


def block_of(layer: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise ValueError(f"a decoder layer of type {type(layer).__name__} has none of {', '.join(names)}")


def hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def _after(adapter: Bottleneck):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)
    return hook


def attach(model, placement: str, width: int, activation: str, dropout: float) -> nn.ModuleDict:
    """Add adapters to every layer; returns them (also registered as `model.bottleneck_adapters`)."""
    hidden = hidden_size(model.config)
    device = next(model.parameters()).device
    adapters = nn.ModuleDict()
    for i, layer in enumerate(decoder_layers(model)):
        spots = [("ffn", FEEDFORWARD_NAMES)]
        if placement == "houlsby":
            spots.insert(0, ("attn", ATTENTION_NAMES))
        for tag, names in spots:
            adapter = Bottleneck(hidden, width, activation, dropout).to(device=device, dtype=torch.float32)
            block_of(layer, names).register_forward_hook(_after(adapter))
            adapters[f"{i}_{tag}"] = adapter
    model.add_module("bottleneck_adapters", adapters)
    return adapters
