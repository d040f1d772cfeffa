"""The results of an evaluation for people (one table), pipelines (JSON) and reading failures (JSON Lines)."""

from __future__ import annotations

import json
from pathlib import Path

from peftctl.errors import InvalidInput

NAMES = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match", "token_f1": "token F1",
         "rouge_l": "ROUGE-L"}


def table(summary: dict):
    """Targets as columns, metrics as rows; from the second column on, each cell also shows the difference to the
    first target and its bootstrap interval, starred when the interval excludes zero."""
    from rich.table import Table

    boot = summary["bootstrap"]
    data = summary["data"]
    t = Table(title=f"{data['path']} ({data['examples']} examples)", title_justify="left",
              caption=f"difference to {summary['targets'][0]['label']} [{boot['confidence']:.0%} paired bootstrap "
                      f"interval, {boot['resamples']} resamples]; * the interval excludes 0; "
                      f"lower is better for {', '.join(summary['lower_is_better']) or 'none'}",
              caption_justify="left")
    t.add_column("metric")
    for target in summary["targets"]:
        t.add_column(target["label"], justify="right", overflow="fold")
    for name in summary["metrics"]:
        cells = [NAMES.get(name, name)]
        for target in summary["targets"]:
            cell = _number(target["metrics"][name])
            diff = target.get("vs_first", {}).get(name)
            if diff is not None:
                ci = diff["ci"]
                interval = f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else ""
                cell += f"\n{_signed(diff['difference'])}{interval}{' *' if diff['excludes_zero'] else ''}"
            cells.append(cell)
        t.add_row(*cells)
    speeds = [t_["examples_per_s"] for t_ in summary["targets"] if "examples_per_s" in t_]
    if len(speeds) == len(summary["targets"]):
        t.add_row("generation ex/s", *[f"{s:,.1f}" for s in speeds], style="dim")
    return t


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _signed(value: float) -> str:
    return f"{value:+.4f}" if abs(value) < 1000 else f"{value:+,.1f}"


def check_out_path(path: str | Path, force: bool) -> Path:
    """--out must not replace a file the user has unless --force says so (peftctl cannot know it wrote it)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise InvalidInput(f"--out {path}: a folder; give a file name such as predictions.jsonl")
    if path.exists() and not force:
        raise InvalidInput(f"--out {path}: the file exists", hint="pass --force to replace it, or another name")
    if not path.parent.is_dir():
        raise InvalidInput(f"--out {path}: no such folder {path.parent}")
    return path


def write_predictions(path: Path, result) -> None:
    """One JSON object per example: where it came from, its prompt, its reference, each target's prediction and
    its per-example scores. Written to a temporary file and renamed, so a failure leaves no half file."""
    from peftctl.files import atomic_write_text

    labels = [t["label"] for t in result.summary["targets"]]
    lines = []
    for i, example in enumerate(result.examples):
        record = {"index": i, "source": example.where, "prompt": example.prompt, "reference": example.reference,
                  "predictions": {label: _at(result.predictions[label], i) for label in labels}}
        scores = {label: {name: values[i] for name, values in result.scores[label].items()} for label in labels}
        if any(scores.values()):
            record["scores"] = scores
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _at(values, i):
    return values[i] if values is not None else None
