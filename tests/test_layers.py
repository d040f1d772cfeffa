"""The import layers of ARCHITECTURE.md hold: no module imports a higher layer, not even inside a function.

A function-local import hides a cycle from Python but not from a reader; this scan reads every module's source, so
it sees those too. To add a module, give it a layer below; to move one, change its layer here and in
ARCHITECTURE.md together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peftctl"

# Lowest first. A module belongs to the longest prefix listed; it may import its own layer and those below.
LAYERS = [
    # foundations: torch-free, each importable alone
    ["peftctl", "peftctl.errors", "peftctl.files", "peftctl.adapter_folder", "peftctl.remote_code",
     "peftctl.fast_path", "peftctl.placement", "peftctl.startup", "peftctl.recipe.base"],
    ["peftctl.data", "peftctl.hub"],  # rows, tokens and batches; where models and data come from
    # the base model and its tokenizer; what the loop changes in it (packed attention, the host embedding)
    ["peftctl.model", "peftctl.generation_config", "peftctl.packed_attention", "peftctl.host_embedding"],
    ["peftctl.methods"],  # one module per method: its recipe section (on recipe.base) and its build step
    ["peftctl.recipe"],  # the recipe, assembled from the methods' sections; torch-free
    ["peftctl.params", "peftctl.plan", "peftctl.serving"],  # counts, the memory plan, the serving check
    ["peftctl.merge", "peftctl.eval"],
    ["peftctl.train"],  # the loop: it evaluates and merges at the end of a run
    ["peftctl.cli", "peftctl.__main__"],
]


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank is not None, f"{module} has no layer: add it to LAYERS (and to ARCHITECTURE.md)"
    return rank


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) of every peftctl import in the file, at any depth; `from peftctl import x` counts as
    peftctl.x when x is a module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                where = root.parent / Path(*sub.split("."))
                is_module = where.with_suffix(".py").exists() or where.is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, mod) for line, mod in found if mod == "peftctl" or mod.startswith("peftctl.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {mod}" for line, mod in imported(path) if layer_of(mod) > own]
    assert not upward, f"{module_name(path)} (layer {own}) imports a higher layer: {upward}"


def test_the_scan_sees_function_local_imports(tmp_path):
    """The scan itself: an import inside a function, relative or absolute, is found with its line."""
    root = tmp_path / "peftctl"
    (root / "train").mkdir(parents=True)
    (root / "train" / "loop.py").write_text("")
    fake = root / "errors.py"
    fake.write_text("import os\n\n\ndef f():\n    from peftctl.train.loop import train\n    from .train import loop\n")
    assert imported(fake, root) == [(5, "peftctl.train.loop"), (6, "peftctl.train.loop")]
    assert layer_of("peftctl.train.loop") > layer_of("peftctl.errors")
