"""The one place where failures become a message, a hint and an exit code (docs/RECIPE.md's exit codes).

Known errors (`PeftctlError` and a few foreign ones recognised by name, so that this module imports no torch)
print a short paragraph; anything unclassified exits 1 with a one-line summary and the hint to rerun with
PEFTCTL_DEBUG=1, which also prints the traceback. Nothing unclassified is ever reported as exit code 2.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from peftctl.errors import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OOM,
    EXIT_SIGINT,
    PeftctlError,
    class_names,
    first_line,
    hub_failure,
)


def _secondary_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) > 0 and not debug_enabled()


def debug_enabled() -> bool:
    return os.environ.get("PEFTCTL_DEBUG", "").strip() not in ("", "0", "false", "no")


def run_guarded(fn: Callable[[], object]) -> int:
    """Run a command body and return its exit code; never lets a traceback reach the user unasked."""
    try:
        result = fn()
        return int(result) if isinstance(result, int) else 0
    except PeftctlError as e:
        _show_traceback()
        if not _secondary_rank():  # under torchrun, rank 0 speaks for all; the others only exit with the code
            report(e.message, e.hint)
        return e.exit_code
    except KeyboardInterrupt:
        _show_traceback()
        report("stopped by Ctrl-C")
        return EXIT_SIGINT
    except BrokenPipeError:
        # `peftctl ... | head` closed the pipe: not an error of ours.
        _silence_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 - this is the top of the program
        _show_traceback()
        message, hint, code = classify(e)
        report(message, hint)
        return code


def classify(e: BaseException) -> tuple[str, str | None, int]:
    """Foreign exceptions we recognise by class name: out of GPU memory, hub errors, disk full."""
    names, kind, text = class_names(e), hub_failure(e), first_line(e)
    if "OutOfMemoryError" in names or "CUDA out of memory" in str(e):
        return (f"out of GPU memory: {text}", "lower training.micro_batch_size or dataset.max_length, turn "
                "training.gradient_checkpointing on, or quantise the base (`peftctl count-params --memory "
                "RECIPE` shows the plan)", EXIT_OOM)
    if kind == "gated":
        return (f"the repository is gated: {text}", "accept its licence on the hub, then `hf auth login`",
                EXIT_INVALID)
    if kind in ("missing", "not_cached", "missing_file"):
        return (f"not found on the hub: {text}", "check the id and revision; private repositories need "
                "`hf auth login`", EXIT_INVALID)
    if kind == "network":
        return (f"the network or the hub cannot be reached: {text}", "check the connection; offline, fetch the "
                "model and data first (`peftctl fetch RECIPE`) and set HF_HUB_OFFLINE=1", EXIT_FAILURE)
    if "UnpicklingError" in names or "weights_only" in str(e):
        # torch's own text goes on to advise weights_only=False, i.e. running the file's code: never repeat it
        return ("a weights file is not valid: it holds more than tensors and plain values, or is damaged; nothing "
                "in it was run", "use weights saved as safetensors, or the checkpoint/adapter that peftctl wrote",
                EXIT_INVALID)
    if (isinstance(e, OSError) and getattr(e, "errno", None) == 28) or _disk_full_text(str(e)):
        # safetensors' SafetensorError wraps the same errno in its own text, and is no OSError
        return (f"no space left on the device: {text}", "free disk space or point output.dir elsewhere; "
                "earlier checkpoints are intact", EXIT_FAILURE)
    summary = f"unexpected error: {type(e).__name__}: {text}"
    hint = None if debug_enabled() else "rerun with PEFTCTL_DEBUG=1 to see the traceback, and report it if it is a bug"
    return summary, hint, EXIT_FAILURE


def _disk_full_text(text: str) -> bool:
    return "No space left on device" in text or "StorageFull" in text


def report(message: str, hint: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    first, _, rest = message.partition("\n")
    console.print(f"[bold red]error:[/] {escape(first)}")
    if rest:
        console.print(escape(rest))
    if hint:
        console.print(f"[yellow]hint:[/] {escape(hint)}")


def warn(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/] {escape(message)}")


def _show_traceback() -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
