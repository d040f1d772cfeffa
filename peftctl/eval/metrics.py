"""Text metrics on (prediction, reference) pairs, and the user's own metric named as `module:function`.

Normalisation (exact match and token F1): Unicode NFKC, case folded, every run of whitespace made one space, and
leading/trailing whitespace removed. Punctuation and articles are kept: dropping them (as SQuAD's script does) is
right for English short answers and wrong for code, numbers with signs, or other languages. Token F1 is the
harmonic mean of precision and recall of the normalised whitespace-separated tokens, counted as a multiset (two
empty texts score 1). ROUGE-L is Google's `rouge-score` (the F-measure of the longest common subsequence); its
tokenizer lower-cases and keeps only ASCII letters and digits, so it scores non-Latin text as empty.

A user metric is user code: it is imported and run only when named on the command line (`--metrics
my_metrics:score`) or in the recipe's `evaluation.metrics`. It receives (prediction, reference) as strings and
returns a number (a bool counts as 0 or 1); the table shows its mean over the examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from peftctl.errors import InvalidInput

LOSS_METRICS = ("loss", "perplexity")
TEXT_METRICS = ("exact_match", "token_f1", "rouge_l")
DEFAULT_METRICS = LOSS_METRICS + TEXT_METRICS
ALIASES = {"ppl": "perplexity", "em": "exact_match", "f1": "token_f1", "rougeL": "rouge_l", "rouge-l": "rouge_l"}
LOWER_IS_BETTER = {"loss", "perplexity"}


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise InvalidInput("rouge_l needs the rouge-score package", hint="pip install rouge-score, or leave "
                               "rouge_l out of --metrics") from None
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


BUILTIN: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1,
                                                   "rouge_l": rouge_l}


def parse_metrics(names: list[str] | None) -> list[str]:
    """The metric names asked for (comma-separated or repeated), in order, aliases resolved; the defaults when
    none. Unknown plain names are an error; `module:function` is kept as the user's metric."""
    if not names:
        return list(DEFAULT_METRICS)
    out: list[str] = []
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            name = ALIASES.get(name, name)
            if name not in DEFAULT_METRICS and ":" not in name:
                raise InvalidInput(f"--metrics: unknown metric {name!r}", hint=f"known: {', '.join(DEFAULT_METRICS)}, "
                                   "or a function of your own as module:function (or path/to/file.py:function)")
            if name not in out:
                out.append(name)
    if not out:
        raise InvalidInput("--metrics: no metric named")
    return out


def load_user_metric(spec: str) -> Callable[[str, str], object]:
    """Import `module:function` (a module on the path or in the current folder, or a .py file)."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise InvalidInput(f"metric {spec!r}: expected module:function")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name).expanduser().absolute()
            if not path.is_file():
                raise InvalidInput(f"metric {spec}: no such file {path}")
            name = f"peftctl_user_metric_{abs(hash(str(path)))}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # as `python -c` would: a module beside the user's data
            module = importlib.import_module(module_name)
    except InvalidInput:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say which and why
        raise InvalidInput(f"metric {spec}: cannot import {module_name} ({type(e).__name__}: {e})",
                           hint="check the module name; a module in the current folder is found, or give a file "
                                "path like ./metrics.py:score") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidInput(f"metric {spec}: {module_name} has no function {function_name!r}")
    return function


def score_function(name: str) -> Callable[[str, str], float]:
    """A scorer for a text metric: built-in, or the user's with its result checked to be a finite number."""
    if name in BUILTIN:
        return BUILTIN[name]
    user = load_user_metric(name)

    def scored(prediction: str, reference: str) -> float:
        value = user(prediction, reference)
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInput(f"metric {name} returned {value!r}; it must return a finite number")
        return float(value)

    return scored


def score_all(names: list[str], predictions: list[str], references: list[str], where: list[str]) -> dict:
    """{metric: per-example scores} for the text metrics among `names`. `where` cites each example (file and
    line) when a user metric fails on it."""
    out = {}
    for name in names:
        if name in LOSS_METRICS:
            continue
        fn = score_function(name)
        values = []
        for i, (prediction, reference) in enumerate(zip(predictions, references)):
            try:
                values.append(fn(prediction, reference))
            except InvalidInput as e:
                raise InvalidInput(f"{where[i]}: {e.message}") from None
            except Exception as e:  # noqa: BLE001 - the user's function raised
                raise InvalidInput(f"{where[i]}: metric {name} raised {type(e).__name__}: {e}",
                                   hint="fix the metric function; the prediction and reference are in --out") \
                    from None
        out[name] = values
    return out
