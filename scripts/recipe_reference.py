"""Print the recipe reference (every key, its default and description) as markdown, from the schema itself.

The README's "Recipe reference" section is this script's output; a test keeps the two identical.

    python scripts/recipe_reference.py            # print it
    python scripts/recipe_reference.py --readme   # rewrite README.md's section with it
"""

from __future__ import annotations

import json


def reference() -> str:
    from peftctl.methods.registry import METHODS
    from peftctl.recipe.schema import SECTIONS, DatasetSource, QuantizationSection

    lines = []
    sections = [("model", SECTIONS["model"]), ("quantization", QuantizationSection)]
    sections += [(f"method ({name})", spec.section) for name, spec in METHODS.items() if name != "qlora"]
    sections += [("dataset", SECTIONS["dataset"]), ("dataset.mix[] (each source of a mix)", DatasetSource)]
    sections += [(name, SECTIONS[name]) for name in ("training", "output", "evaluation")]
    for title, cls in sections:
        lines += [f"**{title}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for key, info in cls.model_fields.items():
            if key == "name" and title.startswith("method"):
                continue
            default = "required" if info.is_required() else json.dumps(info.get_default(call_default_factory=True))
            lines.append(f"| `{key}` | `{default}` | {info.description} |")
        lines.append("")
    lines.append("`qlora` takes the same keys as `lora` and fills `quantization` with 4-bit NF4 double quant "
                 "when it is omitted.")
    return "\n".join(lines) + "\n"


def write_readme(path) -> None:
    text = path.read_text()
    head, rest = text.split("<!-- recipe-reference -->\n", 1)
    _, tail = rest.split("<!-- /recipe-reference -->", 1)
    path.write_text(head + "<!-- recipe-reference -->\n" + reference() + "<!-- /recipe-reference -->" + tail)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if "--readme" in sys.argv:
        write_readme(Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(reference(), end="")
