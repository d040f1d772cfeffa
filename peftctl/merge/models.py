"""Model skeletons built from a config with every parameter on the meta device: the merge reads tensor names and
module structure from them, and verification fills them layer by layer."""

from __future__ import annotations

from contextlib import contextmanager


def empty_model(config, *, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (no memory) and real buffers (rotary tables).

    trust_remote_code: the consent recorded when the adapter was trained; without it transformers would ask on
    stdin (or refuse) for a model whose classes live in its folder."""
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
