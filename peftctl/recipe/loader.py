"""From a recipe file (or stdin) and --set overrides to a validated, resolved `Recipe`.

The order matters: parse YAML with marks -> apply --set (marking each as coming from the command line) -> check
the schema (collecting every error) -> cross-key rules and defaults that depend on the method -> resolve relative
paths. Every problem found is reported at once, each with its line.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from peftctl.errors import InvalidInput, Location, Problem, RecipeError
from peftctl.methods.registry import METHODS
from peftctl.recipe import rules
from peftctl.recipe.schema import SECTIONS, Recipe
from peftctl.recipe.yamlio import Marks, decode, load_yaml


@dataclass
class LoadedRecipe:
    recipe: Recipe
    source: str  # the path as given, or "<stdin>"
    base_dir: Path  # where relative paths of the file were resolved from
    marks: Marks
    warnings: list[str] = field(default_factory=list)

    def where(self, dotted_key: str) -> str:
        """'recipe.yaml:12:3' for a key, to cite the recipe in errors found later (targets that match nothing)."""
        return str(self.marks.of_key(tuple(dotted_key.split("."))))


def read_source(path: str) -> tuple[str, str, Path]:
    """The recipe's text, the name to cite it by, and the folder its relative paths resolve from."""
    if path == "-":
        return decode(sys.stdin.buffer.read(), "<stdin>"), "<stdin>", Path.cwd()
    file = Path(path)
    if file.is_dir():
        raise InvalidInput(f"{path}: is a folder, not a recipe file", hint="pass the recipe's .yaml file")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such recipe file",
                           hint="check the path, or write a new recipe with `peftctl init > recipe.yaml`") from None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the recipe ({e.strerror})") from None
    return decode(data, path), path, file.resolve().parent


def load_recipe(path: str, sets: list[str] | tuple[str, ...] = (), *, check_paths: bool = True) -> LoadedRecipe:
    text, source, base_dir = read_source(path)
    return parse_recipe(text, source, base_dir, sets, check_paths=check_paths)


def parse_recipe(text: str, source: str, base_dir: Path, sets=(), *, check_paths: bool = True) -> LoadedRecipe:
    raw, marks = load_yaml(text, source)
    if raw is None:
        raise RecipeError([Problem(Location(source, 1, 1), "", "the recipe is empty; it needs model, method, "
                                   "dataset and output sections (`peftctl init` prints one)")])
    if not isinstance(raw, dict):
        raise RecipeError([Problem(marks.of_value(()), "", f"a recipe is a mapping of sections (model, method, "
                                   f"dataset, training, output), not {_describe(raw)}")])
    problems = apply_overrides(raw, marks, sets)
    problems += rules.check(raw, marks, base_dir)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems += schema_problems(e, raw, marks)
    if problems:
        raise RecipeError(_in_order(problems))
    recipe, warnings = rules.apply(recipe)
    recipe, problems = rules.resolve_paths(recipe, marks, base_dir, check_exists=check_paths)
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe, source, base_dir, marks, warnings)


def _in_order(problems: list[Problem]) -> list[Problem]:
    """File problems by position, then --set problems in the order given."""
    return sorted(problems, key=lambda p: (p.location.source == "--set", p.location.line or 0,
                                           p.location.column or 0))


# --- --set overrides -------------------------------------------------------------------------------------------

def apply_overrides(raw: dict, marks: Marks, sets) -> list[Problem]:
    """Apply `dotted.key=value` overrides in order; the value is read as YAML (so 32 is a number, [q, v] a list)."""
    problems = []
    for text in sets:
        where = Location("--set", text=text)
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(where, "", "expected dotted.key=value, e.g. --set training.max_steps=50"))
            continue
        try:
            value = load_yaml(value_text, "--set")[0] if value_text.strip() else None  # depth and alias limits
        except RecipeError as e:
            problems.append(Problem(where, key, f"cannot read the value: {e.problems[0].message}"))
            continue
        except yaml.YAMLError as e:
            problems.append(Problem(where, key, f"cannot read the value as YAML ({getattr(e, 'problem', e)})"))
            continue
        path = tuple(key.split("."))
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(where, ".".join(path[: i + 1]), f"is {_describe(child)}, not a section"))
                break
            node = child
        else:
            node[path[-1]] = value
            _mark_tree(marks, path, value, where)
    return problems


def _mark_tree(marks: Marks, path: tuple, value, where: Location) -> None:
    for table in (marks.keys, marks.values):
        for old in [p for p in table if p[: len(path)] == path]:
            del table[old]
    marks.keys[path] = marks.values[path] = where


# --- schema errors -> problems with lines ----------------------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "null",
}


def schema_problems(error: ValidationError, raw: dict, marks: Marks) -> list[Problem]:
    grouped: dict[tuple, list[dict]] = {}
    for err in error.errors():
        path = _data_path(err, raw)
        grouped.setdefault((path, err["type"] in ("extra_forbidden", "missing")), []).append(err)
    problems = []
    for (path, keyish), errs in grouped.items():
        where = marks.of_key(path) if keyish else marks.of_value(path)
        problems.append(Problem(where, ".".join(map(str, path)), _message(path, errs, raw)))
    return problems


def _data_path(err: dict, raw) -> tuple:
    """pydantic's location minus the union tags it adds ('lora', 'float', 'literal[...]')."""
    path: list = []
    node = raw
    loc = err["loc"]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = tuple(loc) + ("name",)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif last and err["type"] in ("missing", "union_tag_invalid", "union_tag_not_found"):
            path.append(part)
    return tuple(path)


def _message(path: tuple, errs: list[dict], raw: dict) -> str:
    kinds = {e["type"] for e in errs}
    first = errs[0]
    got = _get(raw, path)
    if "extra_forbidden" in kinds:
        return _unknown_key(path, raw)
    if "missing" in kinds:
        return "required key is missing"
    if "union_tag_invalid" in kinds:
        close = difflib.get_close_matches(str(got), list(METHODS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown method {got!r}{hint} (one of: {', '.join(METHODS)})"
    if "union_tag_not_found" in kinds:
        return f"required key is missing (one of: {', '.join(METHODS)})"
    if "literal_error" in kinds and len(kinds) == 1:
        expected = first.get("ctx", {}).get("expected", "")
        return f"{_describe(got)} is not allowed; expected {expected}"
    expected = [_EXPECTED[k] for k in sorted(kinds) if k in _EXPECTED]
    literal = [e.get("ctx", {}).get("expected") for e in errs if e["type"] == "literal_error"]
    expected += [x for x in literal if x]
    if expected and all(k in _EXPECTED or k == "literal_error" for k in kinds):
        return f"expected {' or '.join(dict.fromkeys(expected))}, got {_describe(got)}"
    if kinds & {"too_short"}:
        return "must not be empty"
    msg = first["msg"]
    if msg.startswith("Input should be "):
        return f"must be {msg[len('Input should be '):]} (got {_describe(got)})"
    return f"{msg} (got {_describe(got)})"


def _unknown_key(path: tuple, raw: dict) -> str:
    key, parent = str(path[-1]), path[:-1]
    prefix = ".".join(map(str, parent))
    dotted = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
    here = _fields_at(parent, raw)
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {dotted(close[0])}?"
    if parent == ("method",):
        owners = [name for name, spec in METHODS.items() if key in spec.section.model_fields]
        method = raw.get("method", {}).get("name")
        if owners:
            return (f"not a key of method {method} (it belongs to {', '.join(owners)}); "
                    f"keys of {method}: {', '.join(f for f in here if f != 'name')}")
    elsewhere = [f"{section}.{key}" for section, cls in _all_sections() if key in cls.model_fields
                 and (section,) != parent]
    if elsewhere:
        return f"unknown key here; it belongs to {elsewhere[0]}"
    near = [f"{section}.{name}" for section, cls in _all_sections() for name in cls.model_fields
            if difflib.SequenceMatcher(None, key, name).ratio() >= 0.8 and (section,) != parent]
    if near:
        return f"unknown key; did you mean {near[0]}?"
    return f"unknown key (keys here: {', '.join(here)})"


def _fields_at(parent: tuple, raw: dict) -> list[str]:
    if not parent:
        return list(Recipe.model_fields)
    if parent == ("method",):
        spec = METHODS.get(str(raw.get("method", {}).get("name")))
        return list(spec.section.model_fields) if spec else ["name"]
    cls = SECTIONS.get(str(parent[0]))
    return list(cls.model_fields) if cls and len(parent) == 1 else []


def _all_sections():
    yield from SECTIONS.items()
    seen = set()
    for spec in METHODS.values():
        if spec.section not in seen:
            seen.add(spec.section)
            yield "method", spec.section


def _get(raw, path):
    node = raw
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _describe(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
