"""Bottleneck adapters (Houlsby, Pfeiffer): small down-project / activate / up-project blocks with a residual.

peft has no bottleneck adapter, so this one is ours: saved as safetensors plus a JSON config, loaded back by
peftctl, never merged (the activation makes it non-linear).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.registry import MethodSpec
from peftctl.recipe.base import Section


class AdapterSection(Section):
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
