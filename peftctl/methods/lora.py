"""LoRA and its variants: QLoRA (LoRA on a 4-bit NF4 base), DoRA, rsLoRA and LoRA+ (an optimiser setting)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftctl.methods.spec import MethodSpec
from peftctl.recipe.base import MethodSection

Targets = Literal["all-linear"] | list[str]


class LoraSection(MethodSection):
    name: Literal["lora"] = Field(description="The PEFT method.")
    r: int = Field(16, ge=1, le=4096, description="Rank of the low-rank update B @ A.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r "
                         "(alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    targets: Targets = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                             description='Names of the linear layers to adapt (matched on the last name part), '
                             'or "all-linear" for every linear layer but the output head.')
    use_dora: bool = Field(False, description="DoRA: learn a magnitude vector beside the LoRA direction update.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r), which keeps high ranks stable.")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: every B matrix learns at this many "
                                            "times the learning rate of the A matrices (e.g. 16). A matrices, "
                                            "DoRA magnitudes and LoRA factors of embedding layers keep "
                                            "training.learning_rate; run.json records the ratio.")
    modules_to_save: list[str] = Field([], description="Modules trained in full and saved with the adapter, e.g. "
                                       "[embed_tokens, lm_head] after adding tokens (count-params shows their "
                                       "size; vLLM does not serve such adapters, and merge refuses them).")


class QloraSection(LoraSection):
    name: Literal["qlora"] = Field(description="The PEFT method.")


_LORA_COMMON = dict(
    updates="low-rank matrices A and B beside each target linear layer",
    peft_type="LORA",
)

LORA = MethodSpec(name="lora", section=LoraSection, **_LORA_COMMON)
QLORA = MethodSpec(name="qlora", section=QloraSection, **_LORA_COMMON)


def peft_config(section: LoraSection, model_config=None, context=None):
    from peft import LoraConfig

    targets = section.targets if isinstance(section.targets, str) else list(section.targets)
    return LoraConfig(task_type="CAUSAL_LM", r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=targets, use_dora=section.use_dora, use_rslora=section.use_rslora,
                      modules_to_save=list(section.modules_to_save) or None)


def adapt_to_model(model, section: LoraSection, config, context=None):
    """The peft config for this model: on a mixture-of-experts model, the targets resolved to modules and expert
    tensors (peftctl/methods/moe.py says what each name means), and dropout left to `after_attach`, since peft's
    parameter wrapper refuses any. Returns (config, notes)."""
    from peftctl.errors import InvalidInput
    from peftctl.methods import moe

    if not moe.is_moe(model):
        return config, []
    modules, parameters = moe.resolve_targets(model, section.targets)
    notes = []
    quantised = [p for p in parameters if p.endswith(".weight") and moe.is_quantised(model.get_parameter(p))]
    if quantised:
        parameters = [p for p in parameters if p not in quantised]
        layers = sorted({q.rsplit(".", 2)[-2] for q in quantised})
        notes.append(f"not adapted: {', '.join(layers)} ({len(quantised)} quantised Linear layers that peft would "
                     "rename to expert tensors on this model type; train them on a bf16 base)")
    where = f"{context.where}: " if context is not None and getattr(context, "where", "") else ""
    if parameters and section.use_dora:
        raise InvalidInput(f"{where}method.use_dora: DoRA cannot adapt the fused expert tensors of "
                           f"{model.config.model_type} (peft's parameter wrapper has no DoRA)",
                           hint="set method.use_dora: false, or list attention layers only in method.targets")
    if not modules and not parameters:
        raise InvalidInput(f"{where}method.targets: nothing left to adapt on {model.config.model_type}",
                           hint="name attention layers (q_proj, ...) or expert tensors (gate_up_proj, down_proj)")
    config.target_modules = modules or None
    config.target_parameters = parameters or None
    if parameters:
        config.lora_dropout = 0.0
    return config, notes


def after_attach(model, section: LoraSection) -> list[str]:
    """Dropout on the Linear LoRA layers of an MoE model (peft built them with none), and a note of where there is
    none; notes for what the 4-bit base leaves in full precision."""
    from torch import nn

    from peftctl.methods import moe

    notes = []
    wrapped = [m for m in model.modules() if moe.is_param_wrapper(m)]
    if wrapped and section.dropout > 0:
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, nn.ModuleDict) and not moe.is_param_wrapper(module) and hasattr(module, "lora_A"):
                for name in list(dropouts):
                    dropouts[name] = nn.Dropout(p=section.dropout)
        kinds = sorted({".".join(moe.unit_name(n, m).split(".")[-2:]) for n, m in model.named_modules()
                        if moe.is_param_wrapper(m)})
        notes.append(f"method.dropout {section.dropout} applies to the Linear layers only: peft cannot drop out "
                     f"on fused expert tensors ({', '.join(kinds)}); set method.dropout: 0 to silence this")
    experts = [p for n, p in model.named_parameters() if moe.is_expert_tensor(n, p)]
    if experts and any(moe.is_quantised(p) for p in model.parameters()):
        size = sum(p.numel() * p.element_size() for p in experts)
        notes.append(f"4-bit quantisation covers the Linear layers only: the routed experts ({size / 2 ** 30:.2f} "
                     f"GiB) stay in {experts[0].dtype} (bitsandbytes quantises nn.Linear, not fused expert "
                     "tensors); count-params --memory counts them so")
    return notes
