"""Where the time before the first step goes: run.json's `timings.setup_phases`, seconds per phase of `setup`.

Phases are marked in the order setup runs them; a phase that runs twice (the data, prepared again unpacked after
the packing check) adds up. `launch` is the time from the process's start to `setup` (the interpreter, the CLI,
the recipe), read from the kernel's record of the process where there is one (Linux), so that the phases and the
first step add up to launch-to-first-step as `scripts/bench.py` measures it from outside.
"""

from __future__ import annotations

import os
import time


class SetupClock:
    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.time()
        launched = process_start_time()
        if launched is not None and launched <= self._last:
            self.phases["launch"] = self._last - launched

    def mark(self, phase: str) -> None:
        """The time since the previous mark belongs to `phase`."""
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self._last)
        self._last = now

    def as_dict(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.phases.items()}


def process_start_time() -> float | None:
    """When this process started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), counted after ")"
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_after_boot)
