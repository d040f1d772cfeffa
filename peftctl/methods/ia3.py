"""IA3: learned vectors that rescale the activations of the target layers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection


class Ia3Section(MethodSection):
    name: Literal["ia3"] = Field(description="The PEFT method.")
    targets: list[str] = Field(["k_proj", "v_proj", "down_proj"], min_length=1,
                               description="Linear layers whose activations are rescaled.")
    feedforward_targets: list[str] = Field(["down_proj"], description="Those of `targets` that are feed-forward "
                                           "layers: IA3 scales their input instead of their output.")

    def problems(self) -> list[tuple[tuple, str]]:
        stray = [t for t in self.feedforward_targets if t not in self.targets]
        if stray:
            return [(("feedforward_targets",), f"{', '.join(stray)} not in targets; every feed-forward target "
                     "must also be listed in targets")]
        return []


SPEC = MethodSpec(
    name="ia3",
    section=Ia3Section,
    updates="scaling vectors on the target layers' activations",
    peft_type="IA3",
)


def peft_config(section: Ia3Section, model_config=None, context=None):
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM", target_modules=list(section.targets),
                     feedforward_modules=list(section.feedforward_targets))
