"""What a run reports: metrics.jsonl (one object per logged step and per evaluation), the console (a rich progress
bar, or one JSON object per step on stdout with --log-format json), the trackers the recipe lists, and loss.png."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from peftctl.files import atomic_write_text


class Metrics:
    def __init__(self, path: Path, *, total_steps: int, log_format: str = "text", quiet: bool = False,
                 trackers=None, resume_step: int = 0):
        self.path = Path(path)
        self.total_steps = total_steps
        self.log_format = log_format
        self.quiet = quiet
        self.records: list[dict] = []
        if resume_step and self.path.exists():
            # Lines past the checkpoint belong to the interrupted attempt; the resumed run writes them again.
            kept = [r for r in _read(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        self._trackers = trackers
        self._progress = None
        self._task = None
        self._last_text = ""
        self.output_closed = False
        self.on_output_closed = None  # set by the loop: what a closed stdout does to the run
        if log_format == "text" and not quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=resume_step, info="")

    def log(self, record: dict) -> None:
        # "type" tells steps from evaluations for whoever reads metrics.jsonl or the JSON lines.
        kind = {"type": "eval" if "eval_loss" in record else "step"} if "type" not in record else {}
        record = {**kind, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._trackers is not None:
            self._trackers.log(record)
        if self.log_format == "json" and not self.output_closed:
            try:
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                # `peftctl train ... | head -1`: the reader is gone. Not ignorable mid-run: the loop stops cleanly
                # with a checkpoint (on_output_closed) and the run exits 1; metrics.jsonl keeps every record.
                self.output_closed = True
                _silence_stdout()
                if self.on_output_closed is not None:
                    self.on_output_closed()
        if self._progress is not None:
            if "loss" in record:
                # This step's rate: the summary at the end gives the run's average, labelled as such.
                self._last_text = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                   f"{record.get('tokens_per_s', 0):,.0f} tok/s (last step)")
            if "eval_loss" in record:
                self._progress.console.print(f"step {record['step']}: eval loss {record['eval_loss']:.4f}  "
                                             f"perplexity {record['eval_ppl']:.2f}")
            self._progress.update(self._task, completed=record["step"], info=self._last_text)

    def final(self, record: dict) -> None:
        """The last JSON line of --log-format json: how the run ended (status, run folder, exit code)."""
        if self.log_format == "json":
            sys.stdout.write(json.dumps({"type": "final", **record}, default=str) + "\n")
            sys.stdout.flush()

    def close(self, status: str = "completed") -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._trackers is not None:
            self._trackers.close(status)
        self._file.close()


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout that is no file (an embedding application)
        pass


def _read(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def smooth(values, weight: float | None = None) -> list[float]:
    """An exponential moving average, debiased at the start (as TensorBoard draws it); the weight grows with the
    number of points so a long run is smoothed as much as a short one, relatively."""
    weight = weight if weight is not None else min(0.95, 1 - 5 / max(len(values), 10))
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot_loss(records: list[dict], out: Path) -> bool:
    """loss.png: training loss per step and evaluation loss; False when matplotlib is missing or nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.35 if len(train) > 2 else 1.0)
        if len(train) > 2:  # the per-step loss is noisy; the trend is what one reads
            steps, losses = zip(*train)
            ax.plot(steps, smooth(losses), label="train (smoothed)", linewidth=1.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation", linewidth=1.5)
    ax.set_title(f"{Path(out).absolute().parent.name}: loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{time.monotonic_ns()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return True
