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


class StepClock:
    """The time of a step whose work is queued on the device, measured where it runs.

    A mark is a timing event recorded in the device's stream on CUDA, and the host's clock elsewhere (the CPU runs
    each op as it is called). On CUDA a step launched while the previous one still runs begins, on the device's
    clock, where the previous one ends, so each step's time is its own whatever the host was doing: the host reads
    a step's loss late when it has launched the next step first (train/loop.py), and its own clock would then give
    one step's time to its neighbour wherever the loop changes its rhythm (an evaluation, the last step).
    """

    def __init__(self, device):
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        # In the run's device's stream, whichever device is current: the copies it follows were queued there.
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, begin, end) -> float:
        """From one mark to a later one; on CUDA it waits for the device to reach `end`."""
        if not self.cuda:
            return end - begin
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0
