"""Rules that involve several keys, defaults that depend on the method, and path resolution.

An explicit value that cannot work is an error; a default that cannot work turns itself off (packing and
gradient checkpointing for the methods that cannot use them). Each rule names the key the user has to change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from peftctl.errors import Location, Problem
from peftctl.methods.registry import METHODS
from peftctl.recipe.schema import QuantizationSection, Recipe
from peftctl.recipe.yamlio import Marks

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def check(raw: dict, marks: Marks, base_dir: Path) -> list[Problem]:
    """Cross-key rules, read from the raw document so that they are reported beside schema errors.

    Each rule looks only at values of the right type; a value of the wrong type is the schema's to report.
    """
    problems: list[Problem] = []

    def problem(path: tuple, message: str, key_mark: bool = False) -> None:
        where = marks.of_key(path) if key_mark else marks.of_value(path)
        problems.append(Problem(where, ".".join(map(str, path)), message))

    model, method, quant = _section(raw, "model"), _section(raw, "method"), _section(raw, "quantization")
    dataset, training = _section(raw, "dataset"), _section(raw, "training")
    spec = METHODS.get(method.get("name")) if isinstance(method.get("name"), str) else None

    if spec is not None:
        try:
            section = spec.section.model_validate(method)
        except ValueError:
            section = None  # the schema reports it
        for sub_path, message in section.problems() if section else []:
            problem(("method",) + sub_path, message)

    # quantisation
    bits = quant.get("bits", 4) if raw.get("quantization") is not None else None
    if spec is not None and spec.name == "qlora" and bits not in (None, 4) and isinstance(bits, int):
        problem(("quantization", "bits"), "qlora is LoRA on a 4-bit base; use bits: 4, or method.name: lora "
                "for an 8-bit base")
    if bits == 8:
        for key in ("quant_type", "double_quant", "keep_dequantized"):
            if key in quant:
                problem(("quantization", key), "applies to 4-bit quantisation only; remove it, or use bits: 4",
                        key_mark=True)
    if bits is not None and spec is not None and not spec.works_on_4bit:
        problem(("quantization",), f"{spec.name} cannot train on a quantised base: {spec.cannot_4bit}")

    # what the method cannot do: an explicit request is an error (the default turns itself off in `apply`)
    if spec is not None and not spec.can_checkpoint and training.get("gradient_checkpointing") is True:
        problem(("training", "gradient_checkpointing"), f"{spec.name} cannot use gradient checkpointing "
                f"({spec.cannot_checkpoint}); set it to false or auto")
    if spec is not None and not spec.can_pack and dataset.get("packing") is True:
        problem(("dataset", "packing"), f"{spec.name} cannot pack ({spec.cannot_pack}); set packing: false")

    if spec is not None and spec.prompt_learning and model.get("input_embeddings") == "cpu":
        problem(("model", "input_embeddings"), f"{spec.name} reads the embedding's weights on the GPU; set "
                "input_embeddings: auto or gpu")
    if training.get("distributed") == "fsdp" and bits is not None:
        problem(("training", "distributed"), "sharding a quantised base with FSDP2 is not supported: bitsandbytes' "
                "quantised weights lose their quantisation state when sharded; use ddp (a 4-bit 70B base fits "
                "one 80 GB GPU) or a bf16 base")
    tokens = training.get("micro_batch_tokens")
    if tokens is not None and "micro_batch_size" in training:
        problem(("training", "micro_batch_tokens"), "give micro_batch_size or micro_batch_tokens, not both")
    max_length = dataset.get("max_length", 2048)
    if isinstance(tokens, int) and isinstance(max_length, int) and 8 <= tokens < max_length:
        problem(("training", "micro_batch_tokens"), f"{tokens} is less than dataset.max_length ({max_length}): a "
                "full row would not fit; raise it or lower max_length")
    if "warmup_steps" in training and training.get("warmup_ratio") is not None:
        problem(("training", "warmup_ratio"), "give warmup_steps or warmup_ratio, not both")
    has_path, mix = dataset.get("path") is not None, dataset.get("mix")
    if "dataset" in raw and has_path == bool(mix):
        problem(("dataset",), "give dataset.path or dataset.mix (a list of sources), not both" if has_path else
                "needs dataset.path, or dataset.mix with a list of sources", key_mark=True)
    from peftctl.recipe.schema import DatasetSource

    for i, entry in enumerate(mix if isinstance(mix, list) else []):
        try:
            source = DatasetSource.model_validate(entry)
        except ValueError:
            continue  # the schema reports it
        for sub_path, message in source.problems():
            problem(("dataset", "mix", i) + sub_path, message, key_mark=True)
    validation = dataset.get("validation", 0.05)
    for key in ("keep_best", "patience"):
        if training.get(key) not in (None, False) and validation in (0, 0.0, None):
            problem(("training", key), "needs validation data: set dataset.validation to a fraction or a path")
    if isinstance(validation, bool):
        problem(("dataset", "validation"), "expected a fraction, a path or null, got a boolean")
    elif isinstance(validation, (int, float)) and not 0 <= validation < 1:
        problem(("dataset", "validation"), f"a fraction must be at least 0 and below 1 (got {validation}); "
                "or give a path of its own")

    name = model.get("name")
    if model.get("trust_remote_code") is True and isinstance(name, str) and not model.get("revision"):
        if classify_path(name, base_dir)[0] is None:
            problem(("model", "trust_remote_code"), f"{name} is a hub id: pin model.revision to a commit you "
                    "have reviewed before running its code")
    return problems


def apply(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """Defaults that depend on the method; returns the recipe and warnings. Run after `check` found nothing."""
    warnings: list[str] = []
    spec = METHODS[recipe.method.name]
    quant, training, dataset = recipe.quantization, recipe.training, recipe.dataset
    if spec.name == "qlora" and quant is None:
        quant = QuantizationSection(bits=4, quant_type="nf4", double_quant=True)
    checkpointing = training.gradient_checkpointing if spec.can_checkpoint else False
    packing = dataset.packing if spec.can_pack else False  # True, False or auto (decided at start-up)
    if training.max_steps is not None and training.explicitly_set("epochs"):
        warnings.append(f"training.max_steps ({training.max_steps}) is set, so training.epochs is ignored")
    recipe = recipe.model_copy(update={
        "quantization": quant,
        "training": training.model_copy(update={"gradient_checkpointing": checkpointing}),
        "dataset": dataset.model_copy(update={"packing": packing}),
    })
    return recipe, warnings


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def classify_path(value: str, base: Path, *, data: bool = False) -> tuple[Path | None, bool]:
    """(the local path `value` names, or None for a hub id; whether it was unmistakably meant as a path)."""
    expanded = os.path.expanduser(value)
    candidate = Path(expanded) if os.path.isabs(expanded) else base / expanded
    explicit = value.startswith((".", "/", "~")) or os.path.isabs(expanded)
    looks_like_file = data and value.lower().endswith(DATA_SUFFIXES)
    if candidate.exists() or explicit or looks_like_file or not HUB_ID.match(value):
        return candidate, explicit or looks_like_file
    return None, False


def resolve_paths(recipe: Recipe, marks: Marks, base_dir: Path, *, check_exists: bool = True):
    """Make local paths absolute: from the recipe's folder, or from the current folder for --set values."""
    problems: list[Problem] = []

    def base_for(path: tuple) -> Path:
        return Path.cwd() if marks.of_value(path).source in ("--set", "<stdin>") else base_dir

    def local(path: tuple, value: str, *, data: bool = False) -> str | None:
        """The absolute path when `value` names something local; None when it is a hub id."""
        candidate, meant_as_path = classify_path(value, base_for(path), data=data)
        if candidate is None:
            return None
        if check_exists and not candidate.exists():
            what = "file or folder" if data else "folder"
            problems.append(Problem(marks.of_value(path), ".".join(map(str, path)), f"no such {what}: {candidate}"
                                    + ("" if meant_as_path else " (and not a hub id)")))
        return str(candidate.resolve() if candidate.exists() else candidate)

    model = recipe.model
    model_path = local(("model", "name"), model.name)
    template = model.chat_template
    if template is not None and "{" not in template and not _is_builtin_template(template):
        template = local(("model", "chat_template"), template, data=True) or template
    dataset = recipe.dataset
    data_path = local(("dataset", "path"), dataset.path, data=True) if dataset.path else None
    mix = None
    if dataset.mix:
        mix = [entry.model_copy(update={"path": local(("dataset", "mix", i, "path"), entry.path, data=True)
                                        or entry.path}) for i, entry in enumerate(dataset.mix)]
    validation = dataset.validation
    if isinstance(validation, str):
        validation = local(("dataset", "validation"), validation, data=True) or validation
    chat = [i for i, source in enumerate(dataset.sources()) if source.format == "chat"]
    if chat and model_path and not model.chat_template and Path(model_path).is_dir() \
            and lacks_chat_template(Path(model_path)):
        from peftctl.data.templates import BUILTIN_TEMPLATES

        key = ("dataset", "format") if not dataset.mix else ("dataset", "mix", chat[0], "format")
        problems.append(Problem(marks.of_value(key), ".".join(map(str, key)),
                                f"chat data needs a chat template, and {model_path} has none (a base model); name "
                                f"one with model.chat_template: {', '.join(BUILTIN_TEMPLATES)}, or a Jinja file"))
    method = _resolve_init_from(recipe.method, marks, base_for(("method", "init_from")), problems, check_exists)
    out = recipe.output.dir
    out_abs = Path(os.path.expanduser(out))
    out_abs = out_abs if out_abs.is_absolute() else base_for(("output", "dir")) / out_abs
    recipe = recipe.model_copy(update={
        "model": model.model_copy(update={"name": model_path or model.name, "chat_template": template}),
        "dataset": dataset.model_copy(update={"path": data_path or dataset.path, "validation": validation,
                                              "mix": mix}),
        "output": recipe.output.model_copy(update={"dir": str(out_abs.resolve())}),
        "method": method,
    })
    if recipe.evaluation is not None:
        data = local(("evaluation", "data"), recipe.evaluation.data, data=True) or recipe.evaluation.data
        recipe = recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(update={"data": data})})
    return recipe, problems


ADAPTER_CONFIGS = ("adapter_config.json", "bottleneck_config.json")


def _resolve_init_from(method, marks: Marks, base: Path, problems: list, check_exists: bool):
    """method.init_from is always a local adapter folder: absolute, and checked before anything loads."""
    value = getattr(method, "init_from", None)
    if not value:
        return method
    folder = Path(os.path.expanduser(value))
    folder = folder if folder.is_absolute() else base / folder
    mark = marks.of_value(("method", "init_from"))
    if check_exists and not folder.is_dir():
        problems.append(Problem(mark, "method.init_from", f"no such adapter folder: {folder}"))
    elif check_exists and not any((folder / name).exists() for name in ADAPTER_CONFIGS):
        problems.append(Problem(mark, "method.init_from", f"{folder} is not an adapter folder (no "
                                f"{' or '.join(ADAPTER_CONFIGS)}); pass RUN/adapter of an earlier run"))
    return method.model_copy(update={"init_from": str(folder.resolve() if folder.exists() else folder)})


def lacks_chat_template(folder: Path) -> bool:
    """Whether a local model folder holds a tokenizer without a chat template (in any of the places transformers
    reads one). A folder with no tokenizer at all (a config-only folder for count-params) is not judged here."""
    import json

    if not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
        return False
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return False
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return True
    return not config.get("chat_template")


def _is_builtin_template(name: str) -> bool:
    from peftctl.data.templates import BUILTIN_TEMPLATES

    return name in BUILTIN_TEMPLATES


__all__ = ["apply", "resolve_paths", "Location"]
