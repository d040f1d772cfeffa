"""P-tuning: virtual tokens produced by a small trained prompt encoder (MLP or LSTM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection


class PTuningSection(MethodSection):
    name: Literal["p_tuning"] = Field(description="The PEFT method.")
    num_virtual_tokens: int = Field(20, ge=1, le=4096, description="Number of virtual tokens.")
    encoder_type: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder's architecture.")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden size of the prompt encoder "
                                            "(default: the model's hidden size).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")


SPEC = MethodSpec(
    name="p_tuning",
    section=PTuningSection,
    updates="a prompt encoder that produces virtual-token embeddings",
    peft_type="P_TUNING",
    cannot_merge="p-tuning learns extra input tokens (through its prompt encoder), not a change of any weight",
    instead_of_merge="serve it with the base model and peft (PeftModel.from_pretrained), or `peftctl generate`",
    cannot_pack="the virtual tokens are prepended to a whole row, so examples packed into one row would share them",
)


def peft_config(section: PTuningSection, model_config=None, context=None):
    from peft import PromptEncoderConfig

    kwargs = {}
    if section.encoder_hidden_size:
        kwargs["encoder_hidden_size"] = section.encoder_hidden_size
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=section.num_virtual_tokens,
                               encoder_reparameterization_type=section.encoder_type.upper(),
                               encoder_dropout=section.encoder_dropout, **kwargs)
