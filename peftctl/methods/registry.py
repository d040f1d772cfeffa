"""One registry of PEFT methods and what each can do.

Each method module defines a recipe section (a pydantic model whose `name` is the method's name) and a `SPEC`
(a `MethodSpec`, defined in spec.py). Nothing here imports torch: the recipe schema is built from this registry.
"""

from __future__ import annotations

from peftctl.methods.spec import MethodSpec


def _collect() -> dict[str, MethodSpec]:
    from peftctl.methods import bottleneck, ia3, lora, p_tuning, prefix, prompt

    specs: list[MethodSpec] = [lora.LORA, lora.QLORA, prefix.SPEC, prompt.SPEC, p_tuning.SPEC, ia3.SPEC,
                               bottleneck.SPEC]
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _collect()


def get(name: str) -> MethodSpec:
    return METHODS[name]

