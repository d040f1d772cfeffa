"""`peftctl fetch RECIPE`: download the model and datasets on a machine with internet, so that `train` runs with
HF_HUB_OFFLINE=1 on one without."""

from __future__ import annotations


def run(recipe_path: str, sets: list[str]) -> int:
    from rich.console import Console

    from peftctl.hub import fetch
    from peftctl.recipe.loader import load_recipe

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    loaded = load_recipe(recipe_path, sets)
    report = fetch(loaded.recipe, say=lambda m: console.print(m, markup=False))
    for path in report.skipped:
        console.print(f"local, nothing to fetch: {path}", markup=False)
    console.print("done: `HF_HUB_OFFLINE=1 peftctl train ...` now finds everything in the local caches",
                  markup=False)
    return 0
