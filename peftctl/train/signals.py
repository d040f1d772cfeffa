"""SIGINT and SIGTERM during training: the first one asks the loop to finish its optimiser step, save a checkpoint
and exit (130 / 143); a second SIGINT stops at once."""

from __future__ import annotations

import signal
from contextlib import contextmanager

from peftctl.errors import EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGTERM


class StopRequest:
    def __init__(self):
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        if self.signal == signal.SIGPIPE:
            return EXIT_FAILURE  # the output a user relied on is gone: a failure, resumable from the checkpoint
        return EXIT_SIGTERM if self.signal == signal.SIGTERM else EXIT_SIGINT

    @property
    def name(self) -> str:
        if self.signal == signal.SIGPIPE:
            return "a closed standard output (broken pipe)"
        return "SIGTERM" if self.signal == signal.SIGTERM else "SIGINT"

    def output_closed(self) -> None:
        if not self.requested:
            self.signal = signal.SIGPIPE


@contextmanager
def graceful_stop(on_first=None):
    """Install the handlers for the duration of the loop; yields the StopRequest the loop polls."""
    request = StopRequest()

    def handle(signum, frame):
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not request.requested:
            request.signal = signum
            if on_first is not None:
                on_first(request)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, handle)
    except ValueError:  # not the main thread (an embedding application): no handlers, no graceful stop
        previous = {}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
