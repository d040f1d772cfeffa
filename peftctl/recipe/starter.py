"""A commented starter recipe, generated from the schema's descriptions (so it can never drift from them)."""

from __future__ import annotations

import json
import textwrap

from pydantic import BaseModel

from peftctl.methods.registry import METHODS
from peftctl.recipe.schema import SECTIONS, QuantizationSection

STARTER_DATASET = "yahma/alpaca-cleaned"  # a hub dataset in alpaca format; any local file works the same way


def starter_recipe(method: str, model: str) -> str:
    spec = METHODS[method]
    values = {
        "model": {"name": model},
        "quantization": None,
        "method": {"name": method},
        "dataset": {"path": STARTER_DATASET, "packing": spec.can_pack},
        "training": {"gradient_checkpointing": "auto" if spec.can_checkpoint else False},
        "output": {"dir": f"runs/{method}"},
    }
    lines = ["# Starter recipe written by `peftctl init`. Run: peftctl train recipe.yaml",
             "# Every key is shown with its default; `peftctl schema` prints the full reference.", ""]
    for section, cls in [("model", SECTIONS["model"]), ("quantization", QuantizationSection),
                         ("method", spec.section), ("dataset", SECTIONS["dataset"]),
                         ("training", SECTIONS["training"]), ("output", SECTIONS["output"])]:
        given = values[section]
        if section == "quantization" and method != "qlora":
            lines += ["quantization: null                 # omit (or null) for none; e.g. {bits: 4} for a "
                      "4-bit base", ""]
            continue
        lines.append(f"{section}:")
        lines += _section_lines(cls, given or {})
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _section_lines(cls: type[BaseModel], given: dict) -> list[str]:
    out = []
    for name, info in cls.model_fields.items():
        if name in given:
            value = given[name]
        elif info.is_required():
            continue
        else:
            value = info.get_default(call_default_factory=True)
        rendered = f"  {name}: {_yaml_scalar(value)}"
        comment = (info.description or "").replace("\n", " ")
        wrapped = textwrap.wrap(comment, width=80, break_on_hyphens=False) or [""]
        out.append(f"{rendered:<36} # {wrapped[0]}")
        out += [f"{'':<36} # {more}" for more in wrapped[1:]]
    return out


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON flow style is valid YAML
    text = str(value)
    return json.dumps(text) if any(c in text for c in ":#{}[],&*!|>'\"%@`") or text != text.strip() else text
