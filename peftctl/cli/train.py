"""`peftctl train RECIPE`: validate, then run the training loop (or print the plan with --dry-run)."""

from __future__ import annotations

import json
import os

from peftctl.errors import InvalidInput


def run(recipe_path: str, sets: list[str], *, dry_run: bool, resume: str | None, force: bool, quiet: bool,
        log_format: str, gpus: int | None) -> int:
    from rich.console import Console

    from peftctl.cli.errors import warn
    from peftctl.recipe.loader import load_recipe

    if log_format not in ("text", "json"):
        raise InvalidInput(f"--log-format {log_format}: expected text or json")
    loaded = load_recipe(recipe_path, sets)  # validated once here, before any process is started
    if gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ:
        if recipe_path == "-":
            raise InvalidInput("--gpus: a recipe from standard input cannot be passed to several processes",
                               hint="save it to a file first")
        from peftctl.train.distributed import launch

        args = [recipe_path, *(a for s in sets for a in ("--set", s)), "--log-format", log_format]
        args += ["--resume", resume] if resume else []
        args += ["--force"] if force else []
        args += ["--quiet"] if quiet else []
        args += ["--dry-run"] if dry_run else []
        return launch(args, gpus)
    if not quiet:
        for w in loaded.warnings:
            warn(w)
    from peftctl import startup

    startup.hide_bitsandbytes_for_training(loaded.recipe)  # before anything imports peft
    from peftctl.train.loop import TrainOptions, train

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    options = TrainOptions(resume=resume, force=force, quiet=quiet, log_format=log_format, dry_run=dry_run)
    result = train(loaded, options, console=console)
    if dry_run:  # the plan is the command's data: stdout (talk stays on stderr), so `> plan.txt` captures it
        _print_dry_run(result, Console(highlight=False, soft_wrap=True), log_format == "json")
    return 0


def _print_dry_run(report: dict, console, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table(title="plan (dry run: no weights loaded, nothing trained)", show_header=False,
                  title_justify="left")
    for key, value in report.items():
        if key == "params":
            value = value.get("line") or value.get("error")
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,d}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
