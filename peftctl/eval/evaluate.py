"""One evaluation from start to end: targets resolved, data read, every target measured, metrics and the
differences to the first target computed. `peftctl eval` and `train`'s `evaluation:` section both call
`evaluate`; printing and files are report.py's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftctl.errors import InvalidInput
from peftctl.eval import metrics as M
from peftctl.eval.stats import Per, paired_difference

FORMATS = ("alpaca", "chat", "completion", "prompt_completion")


@dataclass
class EvalOptions:
    data: str
    format: str | None = None  # None: the first run folder's dataset.format, else alpaca
    fields: dict[str, str] = field(default_factory=dict)
    metrics: list[str] | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    max_length: int | None = None  # None: the first run folder's dataset.max_length, else 2048
    limit: int | None = None
    system_prompt: str | None = None
    train_on_prompt: bool = False
    split: str = "train"
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    predictions: bool = False  # generate even when no text metric needs it (for --out)
    trust_remote_code: bool = False  # --trust-remote-code: a base's own code may run (never the adapter's say-so)


@dataclass
class EvalResult:
    summary: dict  # what --json prints and run.json keeps
    examples: list  # data.Example, in data order
    predictions: dict[str, list[str]]  # label -> prediction per example
    scores: dict[str, dict[str, list[float]]]  # label -> metric -> per-example score


def evaluate(target_specs: list[str], options: EvalOptions, *, report=None, targets=None) -> EvalResult:
    from peftctl.eval.data import read_eval_data
    from peftctl.eval.run import Settings, evaluate_groups
    from peftctl.eval.targets import plan_groups, resolve_targets

    names = M.parse_metrics(options.metrics)
    for name in names:  # a user metric that cannot be imported fails now, not after the models ran
        if name not in M.LOSS_METRICS:
            M.score_function(name)
    targets = targets or resolve_targets(target_specs, trust_remote_code=options.trust_remote_code)
    options = _with_run_defaults(options, targets)
    tokenizer = _tokenizer(targets[0])
    from peftctl.data.formats import FormatOptions

    fmt = FormatOptions(options.format, dict(options.fields), options.train_on_prompt, options.system_prompt)
    data = read_eval_data(options.data, fmt, tokenizer, max_length=options.max_length, limit=options.limit,
                          split=options.split)
    text_metrics = [n for n in names if n not in M.LOSS_METRICS]
    generate = bool(text_metrics) or (options.predictions and data.generative)
    if text_metrics and not data.generative:
        raise InvalidInput(f"{options.data}: {options.format} rows have no prompt and reference answer, so "
                           f"{', '.join(text_metrics)} cannot be measured", hint="use --metrics loss,perplexity")
    settings = Settings(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                        max_length=options.max_length, loss=any(n in M.LOSS_METRICS for n in names),
                        generate=generate)
    measured = evaluate_groups(plan_groups(targets), data, tokenizer, settings, report=report)
    return _summarise(targets, names, data, measured, options, settings)


def _summarise(targets, names, data, measured, options, settings) -> EvalResult:
    where = [e.where for e in data.examples]
    references = [e.reference for e in data.examples]
    per, predictions, scores = {}, {}, {}
    for target in targets:
        m = measured[target.label]
        text = M.score_all(names, m.predictions, references, where) if m.predictions is not None else {}
        per[target.label] = Per({k: np.asarray(v, dtype=np.float64) for k, v in text.items()}, m.loss_sum, m.trained)
        predictions[target.label] = m.predictions
        scores[target.label] = text
    first = per[targets[0].label]
    rows = []
    for target in targets:
        m, p = measured[target.label], per[target.label]
        entry = {"label": target.label, "kind": target.kind, "base": target.base.name,
                 "adapter": str(target.adapter_dir) if target.adapter_dir else None, "method": target.method,
                 "quantization": json.loads(target.base.quantization) if target.base.quantization else None,
                 "metrics": {n: p.value(n) for n in names}, "timings": m.timings,
                 "generated_tokens": m.generated_tokens}
        if m.timings.get("generate_s"):
            entry["examples_per_s"] = round(len(data.examples) / m.timings["generate_s"], 3)
        if target is not targets[0]:
            entry["vs_first"] = {n: paired_difference(first, p, n, resamples=options.bootstrap,
                                                      confidence=options.confidence, seed=options.seed)
                                 for n in names}
        rows.append(entry)
    summary = {
        "data": {"path": data.path, "format": data.format, "examples": len(data.examples),
                 "truncated": data.truncated, "skipped_no_trained_token": data.skipped_no_trained_token},
        "metrics": names,
        "lower_is_better": [n for n in names if n in M.LOWER_IS_BETTER],
        "targets": rows,
        "bootstrap": {"resamples": options.bootstrap, "confidence": options.confidence, "seed": options.seed,
                      "paired": True},
        "settings": {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
                     "max_length": settings.max_length, "greedy": True},
    }
    return EvalResult(summary, data.examples, predictions, scores)


def _tokenizer(target):
    """The first target's tokenizer (an adapter's own copy, with the chat template it was trained with) reads the
    data for every target, so all are scored on the same tokens."""
    from peftctl.model import load_tokenizer
    from peftctl.recipe.schema import ModelSection

    local = Path(target.tokenizer).is_dir()
    return load_tokenizer(ModelSection(name=target.tokenizer, revision=None if local else target.base.revision,
                                       trust_remote_code=target.base.trust_remote_code))


def _with_run_defaults(options: EvalOptions, targets) -> EvalOptions:
    """Unset format and max_length come from the first run folder's recipe, so that its data file is read and
    masked the way it was trained."""
    import dataclasses

    import yaml

    dataset = {}
    run = next((t.run_dir for t in targets if t.run_dir is not None and (t.run_dir / "recipe.yaml").exists()), None)
    if run is not None:
        try:
            dataset = (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("dataset") or {}
        except (OSError, yaml.YAMLError):
            dataset = {}
    updates = {}
    if options.format is None:
        from_run = dataset.get("format") if not dataset.get("mix") else None
        updates["format"] = from_run or "alpaca"
        if from_run and not options.fields:
            updates["fields"] = dict(dataset.get("fields") or {})
            updates["train_on_prompt"] = bool(dataset.get("train_on_prompt"))
            updates["system_prompt"] = options.system_prompt or dataset.get("system_prompt")
    elif options.format not in FORMATS:
        raise InvalidInput(f"--format: unknown format {options.format!r}", hint=f"one of: {', '.join(FORMATS)}")
    if options.max_length is None:
        updates["max_length"] = int(dataset.get("max_length") or 2048)
    return dataclasses.replace(options, **updates)
