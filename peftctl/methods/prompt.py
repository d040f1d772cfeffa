"""Prompt tuning: learned input embeddings prepended to every sequence."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection


class PromptSection(MethodSection):
    name: Literal["prompt_tuning"] = Field(description="The PEFT method.")
    num_virtual_tokens: int = Field(20, ge=1, le=4096, description="Number of learned virtual tokens.")
    prompt_init_text: str | None = Field(None, min_length=1, description="Initialise the virtual tokens from the "
                                         "embeddings of this text (default: random initialisation).")


SPEC = MethodSpec(
    name="prompt_tuning",
    section=PromptSection,
    updates="virtual-token input embeddings",
    peft_type="PROMPT_TUNING",
    cannot_merge="prompt tuning learns extra input tokens, not a change of any weight",
    instead_of_merge="serve it with the base model and peft (PeftModel.from_pretrained), or `peftctl generate`",
    cannot_pack="the virtual tokens are prepended to a whole row, so examples packed into one row would share them",
)


def peft_config(section: PromptSection, model_config=None, context=None):
    from peft import PromptTuningConfig

    if section.prompt_init_text:
        # peft tokenises the text with the model's tokenizer (BOS included where the tokenizer adds one), and
        # repeats or cuts the ids to num_virtual_tokens
        revision = getattr(context, "tokenizer_revision", None)
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=section.num_virtual_tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=section.prompt_init_text,
                                  tokenizer_name_or_path=context.tokenizer_path,
                                  tokenizer_kwargs={"revision": revision} if revision else None)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=section.num_virtual_tokens,
                              prompt_tuning_init="RANDOM")
