"""`peftctl count-params`: what a recipe trains, and with --memory whether it fits, from the model's config alone.

Two forms: a recipe file (`peftctl count-params RECIPE [--set ...]`), or flags that build the method section in
memory (`--model ID_OR_PATH --method M [--r --alpha --targets --bits --num-virtual-tokens]`), validated by the
same schema so that a bad value reads the same either way. The first line on stdout is peft's own line, with the
figures `peftctl train` prints at its start.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftctl.errors import InvalidInput, Location, Problem, RecipeError

# flag -> the recipe key it fills (errors about that key are reported against the flag)
FLAG_KEYS = {"--model": "model.name", "--method": "method.name", "--r": "method.r", "--alpha": "method.alpha",
             "--targets": "method.targets", "--bits": "quantization.bits",
             "--num-virtual-tokens": "method.num_virtual_tokens"}
PLACEHOLDER = "(not used by count-params)"


def run(recipe_path: str | None, sets: list[str], *, model: str | None, method: str, r: int | None,
        alpha: float | None, targets: str | None, bits: int | None, num_virtual_tokens: int | None,
        json_output: bool, memory: bool, gpu_memory: str | None, micro_batch_size: int | None = None,
        max_length: int | None = None) -> int:
    """micro_batch_size and max_length (for the memory plan) are shorthands for --set training.micro_batch_size
    and --set dataset.max_length, in either form."""
    from peftctl.cli.errors import warn
    from peftctl.params import count_for_recipe

    sets = list(sets) + [f"{key}={value}" for key, value in (("training.micro_batch_size", micro_batch_size),
                                                             ("dataset.max_length", max_length))
                         if value is not None]
    flags = {"--model": model, "--r": r, "--alpha": alpha, "--targets": targets, "--bits": bits,
             "--num-virtual-tokens": num_virtual_tokens}
    if recipe_path is not None:
        given = [name for name, value in flags.items() if value is not None]
        if given:
            raise InvalidInput(f"{', '.join(given)}: with a recipe, change it with --set (e.g. --set method.r=32)",
                               hint="give either a RECIPE or --model with the method flags")
        from peftctl.recipe.loader import load_recipe

        loaded = load_recipe(recipe_path, sets, check_paths=False)
        where = loaded.where("method.targets")
    else:
        if model is None:
            raise InvalidInput("give a RECIPE, or --model with --method and its settings",
                               hint="e.g. peftctl count-params --model meta-llama/Meta-Llama-3-8B --method lora --r 16")
        loaded = recipe_from_flags(model, method, r, alpha, targets, bits, num_virtual_tokens, sets)
        where = f"--targets {targets}" if targets else f"--method {method} (its default targets)"
    for w in loaded.warnings:
        warn(w)

    recipe = loaded.recipe
    card = None
    if memory:
        from peftctl.plan import card_from_option

        card = card_from_option(gpu_memory)  # a bad --gpu-memory fails before any model is built
    counted = count_for_recipe(recipe, where=where)
    plan = None
    if memory:
        from peftctl.plan import plan_memory

        plan = plan_memory(recipe, counted, card=card)

    if json_output:
        out = {"model": recipe.model.name, "method": recipe.method.model_dump(mode="json"),
               "quantization": recipe.quantization.model_dump(mode="json") if recipe.quantization else None,
               **counted.as_dict()}
        if plan is not None:
            out["memory"] = plan.as_dict()
        print(json.dumps(out, indent=2))
        return 0
    print(counted.count.line(), flush=True)
    _print_modules(recipe, counted)
    for note in getattr(counted.model, "peftctl_notes", []):
        print(f"note: {note}")
    if plan is not None:
        _print_plan(plan)
    return 0


def recipe_from_flags(model: str, method: str, r, alpha, targets, bits, num_virtual_tokens, sets):
    """A LoadedRecipe from the flags, validated by the schema; problems are reported against the flags."""
    import yaml

    from peftctl.recipe.loader import parse_recipe

    section: dict = {"name": method}
    for key, value in (("r", r), ("alpha", alpha), ("num_virtual_tokens", num_virtual_tokens)):
        if value is not None:
            section[key] = value
    if targets is not None:
        names = [t.strip() for t in targets.split(",") if t.strip()]
        section["targets"] = "all-linear" if names == ["all-linear"] else names
    raw = {"model": {"name": model}, "method": section, "dataset": {"path": PLACEHOLDER},
           "output": {"dir": PLACEHOLDER}}
    if bits is not None:
        raw["quantization"] = {"bits": bits}
    text = yaml.safe_dump(raw, sort_keys=False)
    given = {"--model": model, "--method": method, "--r": r, "--alpha": alpha, "--targets": targets,
             "--bits": bits, "--num-virtual-tokens": num_virtual_tokens}
    try:
        return parse_recipe(text, "<flags>", Path.cwd(), sets, check_paths=False)
    except RecipeError as e:
        raise RecipeError([_as_flag(p, given) for p in e.problems],
                          hint="`peftctl count-params --help` lists the flags; other keys go through --set") from None


def _as_flag(problem: Problem, given: dict) -> Problem:
    if problem.location.source != "<flags>":
        return problem
    for flag, key in FLAG_KEYS.items():
        if problem.key == key or problem.key.startswith(key + "."):
            return Problem(Location(f"{flag} {given.get(flag)}"), problem.key, problem.message)
    return Problem(Location("--method " + str(given.get("--method"))), problem.key, problem.message)


# --- text output ---------------------------------------------------------------------------------------------

def _console():
    import sys

    from rich.console import Console

    # piped output gets room for the table instead of rich's default 80 columns
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 132)


def _print_modules(recipe, counted) -> None:
    from rich.table import Table

    method = recipe.method
    quant = recipe.quantization
    what = method.name + (f" r={method.r}" if hasattr(method, "r") else "")
    base = f"{quant.bits}-bit base" if quant else f"{recipe.model.dtype} base"
    table = Table(title=f"{what} on {recipe.model.name} ({base}): what is trained", title_justify="left")
    table.add_column("module")
    table.add_column("layers", justify="right")
    table.add_column("in -> out", justify="right")
    table.add_column("tensors (one layer)")
    table.add_column("params each", justify="right")
    table.add_column("total", justify="right")
    for row in counted.modules:
        features = (f"{row['in_features']:,d} -> {row['out_features']:,d}" if row["in_features"] is not None
                    else "")
        table.add_row(row["module"], f"{row['layers']:,d}", features, _tensors(row["tensors"]),
                      f"{row['parameters_each']:,d}" if row["parameters_each"] is not None else "varies",
                      f"{row['parameters']:,d}")
    table.add_section()
    table.add_row("total", "", "", "", "", f"{counted.count.trainable:,d}")
    _console().print(table)


def _tensors(tensors: dict) -> str:
    if len(tensors) > 4:
        return f"{len(tensors)} tensors"
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in tensors.items())


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.2f}"


def _print_plan(plan) -> None:
    from rich.table import Table

    from peftctl.plan.constants import ALLOCATOR_SLACK, CUDA_CONTEXT

    console = _console()
    table = Table(title=f"memory plan: {plan.setting.describe()}", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for c in plan.components:
        table.add_row(c.name, _gib(c.bytes), c.detail)
    table.add_section()
    table.add_row("peak", _gib(plan.peak), "what torch.cuda.max_memory_allocated() should show")
    table.add_row("needed on the card", _gib(plan.needed), f"peak + {ALLOCATOR_SLACK:.0%} allocator slack + "
                  f"{CUDA_CONTEXT / 2 ** 30:.1f} GiB CUDA context")
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False)
    if plan.other is not None:
        other = plan.other
        console.print(f"with gradient checkpointing {'on' if other.setting.checkpointing else 'off'}: peak "
                      f"{_gib(other.peak)} GiB, needed {_gib(other.needed)} GiB", markup=False)
    card = plan.card
    if not card.known:
        console.print(f"card: {card.name}", markup=False)
        return
    if plan.fits:
        console.print(f"fits {card.name} ({_gib(card.bytes)} GiB): {_gib(card.bytes - plan.needed)} GiB to spare",
                      markup=False)
        return
    console.print(f"does not fit {card.name} ({_gib(card.bytes)} GiB): {_gib(plan.needed - card.bytes)} GiB short. "
                  "Change first:", markup=False)
    for n, (change, after) in enumerate(plan.remedies, 1):
        if after is None:
            console.print(f"  {n}. {change}", markup=False)
            continue
        verdict = "fits" if after.fits else "still too much"
        console.print(f"  {n}. {change}: needed {_gib(after.needed)} GiB ({verdict})", markup=False)
