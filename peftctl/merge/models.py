"""Model skeletons built from a config with every parameter on the meta device: the merge reads tensor names and
module structure from them, and verification fills them layer by layer."""

from __future__ import annotations

from contextlib import contextmanager


def empty_model(config, *, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (no memory) and real buffers (rotary tables).

    trust_remote_code: the consent given on the command line (--trust-remote-code); without it transformers
    would ask on stdin (or refuse) for a model whose classes live in its folder."""
    import torch
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


@contextmanager
def _parameters_on_meta():
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def parameter_targets(skeleton, adapter_dir) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """peft's `target_parameters` (mixture-of-experts weights held as 3-D parameters): saved module path ->
    (the parameter's name in the model, its shape, stored as (experts, in, out)). The nesting of peft's wrappers
    (one per targeted parameter of a module) is read from peft itself, built around the empty model."""
    import re

    from peft import PeftModel

    model = PeftModel.from_pretrained(skeleton, str(adapter_dir), low_cpu_mem_usage=True)
    targets = {}
    for path, module in model.base_model.model.named_modules():
        name = getattr(module, "parameter_name", None)
        if name is None or not hasattr(module, "get_base_layer"):
            continue
        owner = module.get_base_layer()
        param = getattr(owner, name)
        full = re.sub(r"\.base_layer(?=\.|$)", "", path) + f".{name}"
        targets[path] = (full, tuple(param.shape), bool(getattr(owner, "is_transposed", False)))
    return targets
