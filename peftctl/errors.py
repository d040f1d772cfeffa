"""The exceptions peftctl raises on purpose, each with its exit code (docs/RECIPE.md).

The library raises these; `peftctl.cli.errors` turns them (and a few foreign ones) into one message, one hint and
an exit code. Nothing here imports torch, so every command can use them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure, network error, anything unexpected
EXIT_INVALID = 2  # invalid recipe, arguments or data; a model or dataset that does not exist or is gated
EXIT_OOM = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class PeftctlError(Exception):
    """A failure we understood: a message for the user, an optional hint with the next step, an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(PeftctlError):
    """The user's input is wrong: recipe, arguments, data, or a model/dataset that does not exist."""

    exit_code = EXIT_INVALID


class DataError(InvalidInput):
    """A dataset row or file that cannot be used; the message names the file and row."""


class ModelNotFound(InvalidInput):
    """A model (or adapter) that is not a folder here and could not be fetched from the hub."""


class OutOfMemory(PeftctlError):
    exit_code = EXIT_OOM


class TrainingStopped(PeftctlError):
    """A run that stopped on a signal after saving a checkpoint (or at once, on a second SIGINT)."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None):
        super().__init__(message, hint)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Location:
    """Where a value of a recipe came from: a file position, standard input, or a --set argument."""

    source: str  # file path as given, "<stdin>", or "--set"
    line: int | None = None
    column: int | None = None
    text: str | None = None  # the --set argument itself

    def __str__(self) -> str:
        if self.source == "--set":
            return f"--set {self.text}"
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One error in a recipe: where it is, the dotted key it concerns, and what is wrong."""

    location: Location
    key: str
    message: str

    def __str__(self) -> str:
        key = f"{self.key}: " if self.key else ""
        return f"{self.location}: {key}{self.message}"

    def as_dict(self) -> dict:
        loc = self.location
        return {"source": loc.source, "line": loc.line, "column": loc.column, "set": loc.text,
                "key": self.key, "message": self.message}


class RecipeError(InvalidInput):
    """Every problem found in a recipe, reported together."""

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid recipe ({count}):\n{lines}", hint or "fix the lines above; "
                         "`peftctl init` prints a commented recipe and `peftctl schema` the full reference")


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (library errors carry pages of context below it); its class name when
    it has no text."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def class_names(e: BaseException) -> set[str]:
    """The names of an exception's class and its bases. Foreign exceptions are recognised by name, not imported:
    huggingface_hub, datasets, requests and httpx have moved them between releases."""
    return {cls.__name__ for cls in type(e).__mro__}


# requests' and httpx's names for a network that does not answer (huggingface_hub moved from one to the other);
# huggingface_hub's OfflineModeIsEnabled is a ConnectionError
NETWORK_ERRORS = {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "ConnectError", "NetworkError",
                  "TransportError", "TimeoutException", "RemoteProtocolError", "OfflineModeIsEnabled"}


def hub_failure(e: BaseException) -> str | None:
    """What a hub (or datasets) exception means: "gated", "missing" (repository, revision or dataset),
    "not_cached" (offline, and the file is not in the cache), "missing_file" (the repository lacks the file),
    "network", or None for anything else. Gated comes first: huggingface_hub's GatedRepoError is a
    RepositoryNotFoundError."""
    names = class_names(e)
    if "GatedRepoError" in names:
        return "gated"
    if names & {"RepositoryNotFoundError", "RevisionNotFoundError", "DatasetNotFoundError", "EmptyDatasetError"}:
        return "missing"
    if "LocalEntryNotFoundError" in names:
        return "not_cached"
    if "EntryNotFoundError" in names:
        return "missing_file"
    if names & NETWORK_ERRORS:
        return "network"
    return None


@contextmanager
def sigterm_raises(error: Callable[[], BaseException]):
    """Inside the block SIGTERM raises error(), so that what is half-built is removed on the way out (SIGINT already
    raises KeyboardInterrupt). Outside the main thread no handler can be set, and nothing changes."""
    def handle(signum, frame):
        raise error()

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
