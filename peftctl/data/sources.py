"""Reading dataset files and hub datasets into `datasets` tables, with row positions users can find.

JSON Lines files are read as text, one line per row, and parsed later in the tokenisation pass: every row then
has its exact line number, a malformed line is one bad row instead of a failed file, and rows whose fields change
type from line to line (which Arrow's schema inference rejects) reach our own checks. `datasets` memory-maps the
result, so a dataset larger than RAM works.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import DataError, InvalidInput, PeftctlError, first_line, hub_failure

SUFFIX_BUILDERS = {".jsonl": "text", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
RAW = "__raw__"  # column holding a JSON line, parsed per row


@dataclass
class Source:
    """One file (or hub split) of rows."""

    name: str  # how errors cite it: a path, or "org/dataset[train]"
    rows: object  # datasets.Dataset; either RAW JSON text per row, or the columns themselves
    unit: str  # "line" for JSON Lines, "row" otherwise
    fingerprint: str

    def where(self, index: int) -> str:
        return f"{self.name} {self.unit} {index + 1}"


def load_sources(spec: str, split: str = "train") -> list[Source]:
    """The files of a local path (a file, or every data file of a folder), or one split of a hub dataset."""
    if os.path.isabs(spec):
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIX_BUILDERS and p.is_file())
            if not files:
                raise DataError(f"{spec}: no data files (.jsonl, .json, .csv, .parquet) in this folder")
            suffixes = {p.suffix.lower() for p in files}
            if len(suffixes - {".jsonl", ".json"}) > 1 or (suffixes & {".csv", ".parquet"} and len(suffixes) > 1):
                raise DataError(f"{spec}: mixes file types ({', '.join(sorted(suffixes))})",
                                hint="keep one type of data file per folder")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{spec}: no such file or folder")
        return [_load_file(f) for f in files]
    return [_load_hub(spec, split)]


def _load_file(path: Path) -> Source:
    import datasets

    suffix = path.suffix.lower()
    if suffix not in SUFFIX_BUILDERS:
        raise DataError(f"{path}: unknown data file type {suffix!r}", hint="use .jsonl, .json, .csv or .parquet")
    fingerprint = file_fingerprint(path)
    quiet = datasets.disable_progress_bars
    quiet()
    try:
        if suffix == ".jsonl":
            rows = datasets.load_dataset("text", data_files=str(path), split="train", keep_linebreaks=False)
            rows = rows.rename_column("text", RAW)
            return Source(str(path), rows, "line", fingerprint)
        if suffix == ".json":
            return Source(str(path), _json_rows(path), "row", fingerprint)
        rows = datasets.load_dataset(SUFFIX_BUILDERS[suffix], data_files=str(path), split="train")
        return Source(str(path), rows, "row", fingerprint)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a problem of this file
        raise DataError(f"{path}: cannot read it as {suffix[1:]} ({first_line(e)})") from e


def _json_rows(path: Path):
    """A .json file holds a list of rows (or {"data": [...]}); each row is kept as JSON text for the same checks."""
    import datasets

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a list of rows",
                        hint="write one JSON object per line in a .jsonl file: a bad line is then one bad row") \
            from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}",
                        hint="or write one JSON object per line in a .jsonl file")
    return datasets.Dataset.from_dict({RAW: [_dumps(row) for row in data]})


def _dumps(row) -> str:
    try:
        return json.dumps(row)
    except RecursionError:
        return "null"  # one bad row: the tokenisation pass reports it with its position


def _load_hub(spec: str, split: str) -> Source:
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001 - classify by name: these classes moved between datasets releases
        kind, text = hub_failure(e), first_line(e)
        if kind == "gated":
            raise InvalidInput(f"dataset {spec} is gated ({text})",
                               hint="accept its terms on the hub, then `hf auth login`") from e
        if kind == "missing" or isinstance(e, FileNotFoundError):
            raise InvalidInput(f"dataset {spec}: not found locally or on the hub ({text})",
                               hint="check the id, or give a local file path (relative to the recipe)") from e
        if isinstance(e, ValueError) and "split" in text.lower():
            raise InvalidInput(f"dataset {spec}: no split {split!r} ({text})", hint="set dataset.split") from e
        if kind == "network":
            raise PeftctlError(f"dataset {spec}: the hub cannot be reached ({text})",
                               hint="check the network, or fetch the data first (`peftctl fetch RECIPE`) and train "
                                    "with HF_HUB_OFFLINE=1, or give a local file path") from e
        raise
    return Source(f"{spec}[{split}]", rows, "row", rows._fingerprint)


def file_fingerprint(path: Path) -> str:
    """Content hash for files up to 1 GiB; beyond that size, time and the first and last MiB (as make would)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if stat.st_size <= 1 << 30:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]
