"""From the recipe's dataset section to tokenised examples, rows and batches.

One pass over the data renders and tokenises every row (in parallel, cached by `datasets` under a key made of the
data, the tokenizer and every setting that changes the result, so a second run starts from the cache). Bad rows
are recorded in that pass, never raised from a worker: the run then stops before training with the file and row of
the first one, or skips and counts them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

from peftctl.data.formats import FormatOptions, RowError, render
from peftctl.data.packing import Batch, collate, pack_examples
from peftctl.data.sources import RAW, Source, load_sources
from peftctl.data.tokenize import special_ids, special_text_in, special_texts, tokenize_rendered
from peftctl.errors import DataError, InvalidInput, first_line

CACHE_VERSION = "3"  # bump when tokenisation changes its output for the same inputs
MAX_REPORTED_ROWS = 20
MAX_CUT_LENGTHS = 100_000  # (prompt, full) token lengths kept of examples that max_length left untrained


@dataclass
class DataStats:
    rows_read: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    skipped_no_trained_token: int = 0
    bad_rows: int = 0
    blank_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "file line 7: missing field 'output'"
    special_text_rows: int = 0  # examples whose own text holds a special token's text
    special_text_examples: list[str] = field(default_factory=list)  # "file line 9: '<|eot_id|>'"
    from_cache: bool = False
    sources: list[dict] = field(default_factory=list)  # per mixed source: available, examples, tokens
    cut_lengths: list[tuple[int, int]] = field(default_factory=list)  # (prompt, full) of examples cut untrained

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "cut_lengths"}
        out["cut_untrained"] = len(self.cut_lengths)
        return out

    def cut_note(self, max_length: int) -> str:
        """What max_length cut away, with the lengths seen and the max_length that keeps them ("" when nothing)."""
        if not self.cut_lengths:
            return ""
        prompts = sorted(p for p, _ in self.cut_lengths)
        longest = max(f for _, f in self.cut_lengths)
        return (f"dataset.max_length {max_length} cut every answer token of {len(prompts):,d} example(s): their "
                f"prompts are {prompts[0]:,d}-{prompts[-1]:,d} tokens (median {prompts[len(prompts) // 2]:,d}); "
                f"max_length {prompts[-1] + 1:,d} keeps a token of every answer, {longest:,d} keeps them whole")


@dataclass
class Split:
    examples: object  # datasets.Dataset with input_ids, labels, length, n_trained
    rows: list[list[int]]  # example indices per row
    stats: DataStats

    @property
    def tokens(self) -> int:
        return self.stats.tokens

    def row_counts(self) -> tuple[list[int], list[int]]:
        """(trained tokens, tokens) per row, computed once."""
        if not hasattr(self, "_row_counts"):
            trained, lengths = list(self.examples["n_trained"]), list(self.examples["length"])
            self._row_counts = ([sum(trained[i] for i in row) for row in self.rows],
                                [sum(lengths[i] for i in row) for row in self.rows])
        return self._row_counts


@dataclass
class PreparedData:
    train: Split
    validation: Split | None
    fingerprint: str
    pad_id: int
    packed: bool
    max_length: int
    warnings: list[str] = field(default_factory=list)  # silent drops made loud: counts, for the run to print

    def step_schedule(self, training, world_size: int = 1) -> StepSchedule:
        return StepSchedule(self, training, world_size)

    @property
    def shares_rows(self) -> bool:
        """Whether any row holds more than one example: only then can packed examples see each other."""
        return self.packed and any(len(row) > 1 for split in (self.train, self.validation) if split is not None
                                   for row in split.rows)

    def trained_tokens(self, split: Split, row_ids) -> int:
        """Trained tokens in these rows, from the table's counts: no collation, no device sync."""
        return sum(split.row_counts()[0][int(r)] for r in row_ids)

    def real_tokens(self, split: Split, row_ids) -> int:
        return sum(split.row_counts()[1][int(r)] for r in row_ids)

    def epoch_order(self, epoch: int, seed: int):
        import numpy as np

        return np.random.default_rng([seed, epoch]).permutation(len(self.train.rows))

    def micro_batches(self, split: Split, row_ids, micro_batch_size: int) -> list[Batch]:
        """Collate the given rows into micro-batches of `micro_batch_size` rows."""
        return [self.collate_rows(split, row_ids[start:start + micro_batch_size])
                for start in range(0, len(row_ids), micro_batch_size)]

    def collate_rows(self, split: Split, row_ids) -> Batch:
        """One micro-batch of these rows."""
        chunk = [split.rows[int(r)] for r in row_ids]
        flat = [i for row in chunk for i in row]
        columns = split.examples[flat] if flat else {"input_ids": [], "labels": []}
        examples = iter({"input_ids": a, "labels": b} for a, b in zip(columns["input_ids"], columns["labels"]))
        return collate([[next(examples) for _ in row] for row in chunk], self.pad_id, self.packed)


def largest_micro_batch_rows(training, max_length: int) -> int:
    """Rows of the largest micro-batch a step can take: micro_batch_size, or as many rows of max_length as
    micro_batch_tokens holds (padding counted, as StepSchedule counts it). What the memory plan, the attention
    probe and run.json's kernel count size for."""
    if training.micro_batch_tokens:
        return max(1, -(-training.micro_batch_tokens // max_length))
    return training.micro_batch_size


class StepSchedule:
    """Which rows each optimiser step takes, epoch by epoch, in micro-batches.

    Each epoch shuffles the rows with the seed; micro-batches take `micro_batch_size` rows, or -- with
    `micro_batch_tokens` -- as many rows as fit that many tokens counting padding (rows x the longest row); a step
    takes gradient_accumulation x world_size micro-batches, and rank r computes every world_size-th of them. A last
    step that cannot give every rank a micro-batch is left out.
    """

    def __init__(self, data: PreparedData, training, world_size: int = 1):
        self.data, self.world_size = data, world_size
        self.seed = training.seed
        self.micro_batch_size = training.micro_batch_size
        self.micro_batch_tokens = training.micro_batch_tokens
        self.per_step = training.gradient_accumulation * world_size
        self._cache: dict[int, list[list[list[int]]]] = {}

    def steps(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._cache:
            self._cache = {epoch: self._build(epoch)}  # one epoch at a time is all the loop needs
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        return len(self.steps(epoch))

    def total(self, epochs: int) -> int:
        if not self.micro_batch_tokens:
            return self.steps_in(0) * epochs  # every epoch has the same number of steps
        return sum(len(self._build(e)) for e in range(epochs))

    def step(self, epoch: int, index: int) -> list[list[int]]:
        return self.steps(epoch)[index]

    def _build(self, epoch: int) -> list[list[list[int]]]:
        order = [int(r) for r in self.data.epoch_order(epoch, self.seed)]
        if self.micro_batch_tokens:
            lengths = self.data.train.row_counts()[1]
            micro, current, longest = [], [], 0
            for r in order:
                widest = max(longest, lengths[r])
                if current and widest * (len(current) + 1) > self.micro_batch_tokens:
                    micro.append(current)
                    current, widest = [], lengths[r]
                current.append(r)
                longest = widest
            if current:
                micro.append(current)
        else:
            size = self.micro_batch_size
            micro = [order[i:i + size] for i in range(0, len(order), size)]
        steps = [micro[i:i + self.per_step] for i in range(0, len(micro), self.per_step)]
        if steps and len(steps[-1]) < self.world_size:
            steps.pop()
        return steps


def prepare(dataset_section, tokenizer, *, seed: int, pad_id: int, packed: bool | None = None,
            num_proc: int | None = None, keep_untrained: bool = False) -> PreparedData:
    """Tokenise the training data (one source, or a weighted mix), split off a validation fraction (or tokenise
    the validation data of its own), and build rows. `keep_untrained` keeps the examples left with no trained
    token (inspect-data shows them), which training skips."""
    packed = bool(dataset_section.packing) if packed is None else packed  # auto packs; train may fall back
    max_length = dataset_section.max_length
    entries = dataset_section.sources()
    if any(e.format == "chat" for e in entries) and not getattr(tokenizer, "chat_template", None):
        from peftctl.data.templates import BUILTIN_TEMPLATES

        raise InvalidInput("the data is in chat format but the tokenizer has no chat template",
                           hint=f"name one with model.chat_template: {', '.join(BUILTIN_TEMPLATES)}, or a Jinja "
                                "file")
    parts = []
    for entry in entries:
        options = _options(entry, dataset_section)
        parts.append(_tokenize_all(load_sources(entry.path, entry.split), options, tokenizer, max_length,
                                   dataset_section.on_bad_rows, num_proc, keep_untrained))
    warnings = _drop_warnings(parts, entries, max_length)
    validation = None
    spec = dataset_section.validation
    if len(parts) > 1 and isinstance(spec, float) and spec > 0:
        # Each source is split before mixing, so that an example repeated by the mix stays on its side.
        val_parts, parts = zip(*(_split_off(p, spec, seed, i) for i, p in enumerate(parts)))
        val_examples = _concat([v for v in val_parts if len(v)])
        if val_examples is not None:
            validation = Split(val_examples, _rows(val_examples, packed, max_length), _count(val_examples))
        parts = list(parts)
    if len(parts) == 1:
        examples, stats, fingerprint = parts[0]
    else:
        examples, stats, fingerprint = _mix(entries, parts, seed)
    if isinstance(spec, str):
        options = _options(entries[0], dataset_section)
        val_sources = load_sources(spec, "validation" if not os.path.isabs(spec) else "train")
        val_examples, val_stats, val_fp = _tokenize_all(val_sources, options, tokenizer, max_length,
                                                        dataset_section.on_bad_rows, num_proc)
        warnings += _overlap_warnings(spec, val_examples, examples)
        validation = Split(val_examples, _rows(val_examples, packed, max_length), val_stats)
        fingerprint = _hash(fingerprint, val_fp)
    elif spec and len(parts) == 1 and len(examples) >= 2:
        val_examples, (examples, stats, fingerprint) = _split_off(parts[0], spec, seed, None)
        validation = Split(val_examples, _rows(val_examples, packed, max_length), _count(val_examples))
    if spec and validation is None and len(examples) > 0:
        raise DataError(f"dataset.validation: {spec} of {len(examples)} example(s) leaves nothing to validate on "
                        "(or nothing to train on)", hint="add data, or set dataset.validation: 0 for no validation")
    if len(examples) == 0:
        where = dataset_section.path or ", ".join(e.path for e in entries)
        if stats.cut_lengths:
            raise DataError(f"{where}: no usable training examples: {stats.cut_note(max_length)}",
                            hint=f"raise dataset.max_length (--set dataset.max_length={_round_up(stats)}) or "
                                 "shorten the prompts; `peftctl inspect-data RECIPE` shows the examples as cut")
        raise DataError(f"{where}: no usable training examples ({stats.rows_read} rows read, "
                        f"{stats.bad_rows} bad, {stats.skipped_no_trained_token} with no trained token)",
                        hint="check dataset.format and dataset.fields against the file's columns "
                             "(`peftctl inspect-data RECIPE`)")
    train = Split(examples, _rows(examples, packed, max_length), stats)
    return PreparedData(train, validation, fingerprint, pad_id, packed, max_length, warnings)


def _split_off(part, fraction: float, seed: int, source: int | None):
    """(validation examples, (training examples, stats, fingerprint)) of one tokenised source; at least one
    example on each side, none when the source has fewer than two."""
    import numpy as np

    examples, stats, fingerprint = part
    if len(examples) < 2:
        return examples.select([]), part
    key = [seed, 1_000_003] if source is None else [seed, 1_000_003, source]  # one source: as before the mix
    order = np.random.default_rng(key).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    train = examples.select(train_idx)
    return examples.select(val_idx), (train, _recount(stats, train), fingerprint)


def _concat(parts):
    import datasets

    if not parts:
        return None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _drop_warnings(parts, entries, max_length: int) -> list[str]:
    """Examples lost without an error: cut by max_length, or left with no trained token."""
    out = []
    for entry, (_, stats, _) in zip(entries, parts):
        read = stats.examples + stats.skipped_no_trained_token
        if stats.skipped_no_trained_token:
            out.append(f"{entry.path}: {stats.skipped_no_trained_token} of {read} examples skipped: no trained "
                       f"token left within dataset.max_length {max_length} (raise max_length to keep them)")
        if stats.truncated:
            out.append(f"{entry.path}: {stats.truncated} of {read} examples cut at dataset.max_length "
                       f"{max_length}")
    return out


def _overlap_warnings(spec: str, validation, train) -> list[str]:
    """A validation set that repeats training examples measures memory, not generalisation: refuse it whole,
    count it in part."""
    seen = set()
    for batch in train.iter(batch_size=4096):
        seen.update(hashlib.sha1(str(ids).encode()).digest() for ids in batch["input_ids"])
    shared = sum(1 for batch in validation.iter(batch_size=4096) for ids in batch["input_ids"]
                 if hashlib.sha1(str(ids).encode()).digest() in seen)
    if shared and shared == len(validation):
        raise DataError(f"dataset.validation {spec}: all {shared} validation examples are also training examples",
                        hint="validate on data the run does not train on, or use a fraction (dataset.validation: "
                             "0.05)")
    return [f"dataset.validation {spec}: {shared} of {len(validation)} validation examples are also training "
            "examples; the eval loss is partly measured on memorised data"] if shared else []


def _round_up(stats: DataStats) -> int:
    """A max_length that keeps every answer whole, rounded up to a multiple of 64 (kernels like round shapes)."""
    longest = max(f for _, f in stats.cut_lengths)
    return -(-longest // 64) * 64


def _options(entry, section) -> FormatOptions:
    return FormatOptions(entry.format, dict(entry.fields), section.train_on_prompt,
                         entry.system_prompt or section.system_prompt)


def _mix(entries, parts, seed: int):
    """Take each source's share: `examples` where given, else a weight's share of all weighted sources' examples;
    sampled with the seed, repeating a source that has fewer examples than its share."""
    import datasets
    import numpy as np

    weighted = [(e, p) for e, p in zip(entries, parts) if e.examples is None]
    pool = sum(len(p[0]) for _, p in weighted)
    total_weight = sum(e.weight for e, _ in weighted) or 1.0
    chosen, stats, fingerprints, report = [], DataStats(from_cache=True), [], []
    for i, (entry, (examples, part_stats, fingerprint)) in enumerate(zip(entries, parts)):
        want = entry.examples if entry.examples is not None else round(pool * entry.weight / total_weight)
        have = len(examples)
        if have == 0 or want == 0:
            picked = []
        else:
            rng = np.random.default_rng([seed, 2_000_003, i])
            repeats, rest = divmod(want, have)
            picked = [j for _ in range(repeats) for j in rng.permutation(have).tolist()]
            picked += sorted(rng.choice(have, size=rest, replace=False).tolist())
        part = examples.select(picked)
        chosen.append(part)
        report.append({"source": entry.path, "split": entry.split, "weight": entry.weight if entry.examples is None
                       else None, "available": have, "examples": len(picked),
                       "tokens": int(sum(part["length"])) if len(part) else 0})
        stats = _merge(stats, part_stats)
        fingerprints.append(f"{fingerprint}:{entry.weight}:{entry.examples}")
    mixed = datasets.concatenate_datasets([c for c in chosen if len(c)]) if any(len(c) for c in chosen) \
        else chosen[0]
    stats = _recount(stats, mixed)
    stats.sources = report
    return mixed, stats, _hash(*fingerprints)


def _rows(examples, packed: bool, max_length: int) -> list[list[int]]:
    if not packed:
        return [[i] for i in range(len(examples))]
    return pack_examples(list(examples["length"]), max_length)


def _tokenize_all(sources: list[Source], options, tokenizer, max_length, on_bad_rows, num_proc,
                  keep_untrained: bool = False):
    import datasets

    parts, stats, fingerprints = [], DataStats(from_cache=True), []
    key = _hash(CACHE_VERSION, json.dumps(options.__dict__, sort_keys=True), str(max_length),
                tokenizer_fingerprint(tokenizer))
    for source in sources:
        part, part_stats = _tokenize_source(source, options, tokenizer, max_length, _hash(key, source.fingerprint),
                                            num_proc, keep_untrained)
        stats = _merge(stats, part_stats)
        parts.append(part)
        fingerprints.append(source.fingerprint)
    if stats.bad_rows and on_bad_rows == "error":
        more = stats.bad_rows - 1
        others = f" (and {more} more bad row{'s' if more > 1 else ''})" if more else ""
        raise DataError(stats.bad_examples[0] + others,
                        hint="fix the row, map columns with dataset.fields, or set dataset.on_bad_rows: skip to "
                             "skip and count bad rows")
    examples = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return examples, stats, _hash(*fingerprints)


def _tokenize_source(source: Source, options, tokenizer, max_length: int, key: str, num_proc,
                     keep_untrained: bool = False):
    import re

    eos_id = tokenizer.eos_token_id
    specials = special_ids(tokenizer)
    texts = special_texts(tokenizer)
    special_pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
    raw = RAW in source.rows.column_names

    def one(row: dict) -> dict:
        try:
            if raw:
                row = parse_raw_row(row[RAW])
                if row is None:
                    return _empty("")
            try:
                rendered = render(row, options, tokenizer)
            except RowError:
                raise
            except Exception as e:  # noqa: BLE001 - a chat template that raises on this conversation
                raise RowError(f"the chat template refused this row: {first_line(e)}") from None
            special_text = special_text_in(row, special_pattern) if special_pattern else ""
            return {**tokenize_rendered(rendered, tokenizer, max_length, eos_id, specials), "error": "",
                    "special_text": special_text}
        except RowError as e:
            return _empty(str(e) or "bad row")
        except RecursionError:  # a row nested thousands deep: one bad row, not a dead run
            return _empty("nested too deeply to be a row")

    cache_dir = _cache_dir(source.rows)
    cached = bool(cache_dir and glob.glob(os.path.join(cache_dir, f"cache-{key}*.arrow")))
    procs = num_proc if num_proc is not None else _default_procs(len(source.rows))
    features = _features()
    mapped = source.rows.map(one, remove_columns=source.rows.column_names, new_fingerprint=key,
                             num_proc=procs, features=features, desc=f"tokenising {os.path.basename(source.name)}")
    errors, lengths = mapped["error"], mapped["length"]
    stats = DataStats(rows_read=len(mapped), from_cache=cached)
    keep = []
    for i, (error, length) in enumerate(zip(errors, lengths)):
        if error:
            stats.bad_rows += 1
            if len(stats.bad_examples) < MAX_REPORTED_ROWS:
                stats.bad_examples.append(f"{source.where(i)}: {error}")
        elif length == 0:
            stats.blank_lines += 1
        else:
            keep.append(i)
    n_trained, truncated, special_text = mapped["n_trained"], mapped["truncated"], mapped["special_text"]
    prompt_lengths, full_lengths = mapped["prompt_length"], mapped["full_length"]
    usable = []
    for i in keep:
        stats.truncated += int(truncated[i])
        if n_trained[i] == 0:
            stats.skipped_no_trained_token += 1
            if truncated[i] and prompt_lengths[i] < full_lengths[i] and len(stats.cut_lengths) < MAX_CUT_LENGTHS:
                stats.cut_lengths.append((prompt_lengths[i], full_lengths[i]))
            if not keep_untrained:
                continue
        usable.append(i)
        if special_text[i]:
            stats.special_text_rows += 1
            if len(stats.special_text_examples) < MAX_REPORTED_ROWS:
                stats.special_text_examples.append(f"{source.where(i)}: {special_text[i]!r}")
    examples = mapped.select(usable).select_columns(["input_ids", "labels", "length", "n_trained"])
    stats = _recount(stats, examples)
    return examples, stats


def parse_raw_row(text: str) -> dict | None:
    """One JSON Lines row as a dict; None for a blank line; RowError for anything else."""
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except RecursionError:
        raise RowError("nested too deeply to be a row") from None
    except ValueError as e:
        raise RowError(f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object with the format's fields, got {type(row).__name__}")
    return row


def _features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_trained": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "error": datasets.Value("string"),
        "special_text": datasets.Value("string"),
        "prompt_length": datasets.Value("int32"),
        "full_length": datasets.Value("int32"),
    })


def _empty(error: str) -> dict:
    return {"input_ids": [], "labels": [], "length": 0, "n_trained": 0, "truncated": False, "error": error,
            "special_text": "", "prompt_length": 0, "full_length": 0}


def _count(examples) -> DataStats:
    return _recount(DataStats(rows_read=len(examples)), examples)


def _recount(stats: DataStats, examples) -> DataStats:
    stats.examples = len(examples)
    stats.tokens = int(sum(examples["length"])) if len(examples) else 0
    stats.trained_tokens = int(sum(examples["n_trained"])) if len(examples) else 0
    return stats


def _merge(a: DataStats, b: DataStats) -> DataStats:
    out = DataStats()
    for name, value in a.__dict__.items():
        other = getattr(b, name)
        if isinstance(value, list):
            capped = name in ("bad_examples", "special_text_examples")
            setattr(out, name, (value + other)[:MAX_REPORTED_ROWS] if capped else value + other)
        elif isinstance(value, bool):  # from_cache: every source came from the cache
            setattr(out, name, value and other)
        else:
            setattr(out, name, value + other)
    return out


def _cache_dir(rows) -> str | None:
    files = getattr(rows, "cache_files", None)
    return os.path.dirname(files[0]["filename"]) if files else None


def _default_procs(n_rows: int) -> int | None:
    if n_rows < 20_000:
        return None  # starting workers costs more than it saves
    return max(1, min(8, (os.cpu_count() or 1)))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return _hash(type(tokenizer).__name__, body, str(tokenizer.chat_template), str(tokenizer.eos_token),
                 str(tokenizer.bos_token))


def _hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
