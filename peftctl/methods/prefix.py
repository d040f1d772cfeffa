"""Prefix tuning: learned key/value states prepended at every attention layer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection


class PrefixSection(MethodSection):
    name: Literal["prefix_tuning"] = Field(description="The PEFT method.")
    num_virtual_tokens: int = Field(20, ge=1, le=4096, description="Length of the learned prefix.")
    projection: bool = Field(False, description="Learn the prefix through a two-layer MLP (reparameterisation) "
                             "instead of directly; more parameters, often more stable.")
    projection_hidden_size: int | None = Field(None, ge=1, description="Hidden size of that MLP "
                                               "(default: the model's hidden size).")


SPEC = MethodSpec(
    name="prefix_tuning",
    section=PrefixSection,
    updates="key/value prefixes at every layer",
    peft_type="PREFIX_TUNING",
    cannot_merge="prefix tuning adds learned key/value states at every layer; there is no weight to fold them into",
    instead_of_merge="serve it with the base model and peft (PeftModel.from_pretrained), or `peftctl generate`",
    cannot_pack="the virtual tokens are prepended to a whole row, so examples packed into one row would share them",
    cannot_checkpoint="peft's prefix tuning passes its prefix as a key/value cache, which gradient "
                      "checkpointing in transformers refuses",
)


def peft_config(section: PrefixSection, model_config=None, context=None):
    from peft import PrefixTuningConfig

    kwargs = {}
    if section.projection_hidden_size:
        kwargs["encoder_hidden_size"] = section.projection_hidden_size
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=section.num_virtual_tokens,
                              prefix_projection=section.projection, **kwargs)
