"""`peftctl validate RECIPE...`: schema and rules, every error of every recipe at once."""

from __future__ import annotations

import json

from peftctl.errors import EXIT_INVALID, PeftctlError, RecipeError


def run(paths: list[str], sets: list[str], json_output: bool) -> int:
    from rich.console import Console
    from rich.markup import escape

    from peftctl.cli.errors import report, warn
    from peftctl.recipe.loader import load_recipe

    results, failed = [], False
    out = Console(highlight=False, soft_wrap=True)
    for path in paths:
        try:
            loaded = load_recipe(path, sets)
        except PeftctlError as e:
            if not isinstance(e, RecipeError) and e.exit_code != EXIT_INVALID:
                raise
            failed = True
            problems = [p.as_dict() for p in e.problems] if isinstance(e, RecipeError) else [
                {"source": path, "line": None, "column": None, "set": None, "key": "", "message": e.message}]
            results.append({"recipe": path, "valid": False, "errors": problems, "warnings": []})
            if not json_output:
                report(e.message, e.hint if len(paths) == 1 else None)
            continue
        results.append({"recipe": path, "valid": True, "errors": [], "warnings": loaded.warnings,
                        "method": loaded.recipe.method.name, "model": loaded.recipe.model.name})
        if not json_output:
            for w in loaded.warnings:
                warn(f"{path}: {w}")
            out.print(f"[green]ok[/] {escape(path)}: {loaded.recipe.method.name} on {escape(loaded.recipe.model.name)}")
    if json_output:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    return EXIT_INVALID if failed else 0
