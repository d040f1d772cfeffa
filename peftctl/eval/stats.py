"""Paired bootstrap confidence intervals for the difference of a metric between two targets.

Both targets were scored on the same examples, so the examples are resampled together (paired): the interval
reflects how much the difference depends on which examples happened to be in the data, which is what "better on
200 examples" needs. Means of per-example scores are resampled as means; loss is a ratio (summed token loss over
trained tokens, as in training), so each resample recomputes the ratio, and perplexity is exp of it. Percentile
intervals with a fixed seed: the same data gives the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHUNK = 256  # resamples per block, so memory stays at CHUNK x examples


@dataclass
class Per:
    """A target's per-example measurements: scores per text metric, and (token loss sum, trained tokens)."""

    scores: dict[str, np.ndarray]
    loss_sum: np.ndarray | None = None
    trained: np.ndarray | None = None

    def value(self, metric: str, idx=None) -> np.ndarray | float:
        """The metric over all examples, or over each row of resampled indices `idx` [B, n]."""
        if metric in ("loss", "perplexity"):
            if idx is None:
                loss = float(self.loss_sum.sum() / max(1, self.trained.sum()))
                return _ppl(loss) if metric == "perplexity" else loss
            loss = self.loss_sum[idx].sum(1) / np.maximum(1, self.trained[idx].sum(1))
            return np.exp(np.minimum(loss, 50.0)) if metric == "perplexity" else loss
        values = self.scores[metric]
        return float(values.mean()) if idx is None else values[idx].mean(1)


def paired_difference(a: Per, b: Per, metric: str, *, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """b - a on `metric`, with its bootstrap interval; `excludes_zero` says whether the interval leaves 0 out."""
    n = len(a.trained) if metric in ("loss", "perplexity") else len(a.scores[metric])
    difference = float(b.value(metric) - a.value(metric))
    if n < 2 or resamples < 1:
        return {"difference": difference, "ci": None, "excludes_zero": False}
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, resamples - start), n))
        draws.append(b.value(metric, idx) - a.value(metric, idx))
    diffs = np.concatenate(draws)
    tail = (1 - confidence) / 2 * 100
    low, high = (float(x) for x in np.percentile(diffs, [tail, 100 - tail]))
    return {"difference": difference, "ci": [low, high], "excludes_zero": bool(low > 0 or high < 0)}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
