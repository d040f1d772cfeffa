"""LoRA targets on mixture-of-experts models: attention, shared and routed experts, and the router on request.

Current transformers (5.x) holds the routed experts of Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss as fused 3-D
parameters (`experts.gate_up_proj`: experts x ... x ..., `experts.down_proj`), not Linear modules; peft adapts
them with `target_parameters` (its ParamWrapper: one LoRA pair per expert). What peftctl means by the targets:

- `all-linear`: every Linear layer but the output head and the router (attention, shared experts, dense MLP
  layers) plus every routed expert tensor. The router stays frozen by default: adapting the routing shifts which
  experts see which tokens, which is rarely what a fine-tune wants; name it (`gate`, `router`) to train it.
- a list: each name matches Linear modules as before (the whole path or its last parts) and expert or router
  tensors by their path (`experts.gate_up_proj`, `gate_up_proj`, `down_proj` -- which also matches a shared
  expert's `down_proj` Linear).

The resolved targets are handed to peft as full module paths and parameter paths. peft (0.21) rewrites the
targets of some MoE model types as if they came from a transformers 4 adapter (`down_proj` -> the experts'
`down_proj` tensor, which would silently drop a shared expert's `down_proj` Linear): such Linear layers are
given as parameters (`...shared_experts.down_proj.weight`), which that rewrite leaves alone, so what is trained
is what was resolved, on the first attach and on every reload by stock peft.

Dropout: peft's ParamWrapper cannot drop out (LoRA's input is not separable from a fused expert's). peftctl
applies method.dropout to every Linear LoRA layer and none to parameter-wrapped tensors, and says so in a note.
"""

from __future__ import annotations

ROUTER_NAMES = ("gate", "router")


def expert_parameters(model) -> list[str]:
    """Paths of the fused expert tensors (3-D parameters: experts x in x out), e.g.
    model.layers.1.mlp.experts.down_proj."""
    return [name for name, p in model.named_parameters() if is_expert_tensor(name, p)]


def is_expert_tensor(name: str, param) -> bool:
    """A fused expert tensor: 3-D and held by an `experts` module (a depthwise Conv1d's weight, as in Qwen3-Next's
    linear attention, is 3-D too but no expert)."""
    return param.ndim == 3 and "lora_" not in name and ".experts." in f".{name}"


def is_moe(model) -> bool:
    return bool(expert_parameters(model))


def router_modules(model) -> list[str]:
    """The routers: a `gate` or `router` module beside an `experts` module, and the shared expert's gate (Qwen2-MoE,
    Qwen3-Next: a Linear to one scalar that weighs the shared expert against the routed ones)."""
    names = {name for name, _ in model.named_modules()}
    out = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if (leaf in ROUTER_NAMES or leaf == "shared_expert_gate") and f"{parent}.experts" in names:
            out.append(name)
    return sorted(out)


def _linear_modules(model) -> list[str]:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = torch.nn.Linear
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if name and isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and "lora_" not in name]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def renamed_by_peft(model) -> set[str]:
    """Last names of Linear layers that peft's transformers-4 compatibility rewrite turns into expert tensors for
    this model type (empty where it rewrites nothing, or in a peft without it)."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except Exception:  # noqa: BLE001 - older peft/transformers: no rewrite
        return set()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if get_checkpoint_conversion_mapping(model_type) is None:
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))


def resolve_targets(model, targets) -> tuple[list[str], list[str]]:
    """(module paths, parameter paths) that `targets` means on this MoE model (see the module docstring)."""
    linear = _linear_modules(model)
    routers = router_modules(model)
    experts = expert_parameters(model)
    if targets == "all-linear":
        modules = [n for n in linear if n not in routers]
        parameters = list(experts)
    else:
        modules = [n for n in linear if any(_matches(n, t) for t in targets)]
        parameters = [p for p in experts if any(_matches(p, t) for t in targets)]
        # a router that is not a Linear module (Mixtral's, Qwen3-MoE's) is reached through its weight
        parameters += [f"{r}.weight" for r in routers if r not in modules and any(_matches(r, t) for t in targets)]
    renamed = renamed_by_peft(model)
    as_parameters = [n for n in modules if n.rpartition(".")[2] in renamed]
    modules = [n for n in modules if n not in as_parameters]
    parameters += [f"{n}.weight" for n in as_parameters]
    return modules, sorted(set(parameters), key=parameters.index)


def targets_param_names(model) -> list[str]:
    """What `targets` can name on this model beyond Linear layers: expert tensors and routers (for messages)."""
    names = {p.rpartition(".")[2] for p in expert_parameters(model)}
    names |= {r.rpartition(".")[2] for r in router_modules(model)}
    return sorted(names)


def is_quantised(weight) -> bool:
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def unit_name(name: str, module) -> str:
    """A tuner layer's row path; for peft's LoRA on a parameter (MoE experts, nested as experts.base_layer...) the
    unwrapped module path and the parameter: model.layers.0.mlp.experts.gate_up_proj."""
    parameter = getattr(module, "parameter_name", None)
    if parameter is None:
        return name
    path = ".".join(p for p in name.split(".") if p != "base_layer")
    return path if parameter == "weight" else f"{path}.{parameter}"


def is_param_wrapper(module) -> bool:
    """peft's LoRA on a parameter (fused MoE experts): not a Linear layer."""
    return type(module).__name__ == "ParamWrapper" and hasattr(module, "parameter_name")
