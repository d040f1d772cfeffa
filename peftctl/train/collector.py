"""What `peftctl train` does with Python's garbage collector, and why.

A full collection walks every tracked object in the process, and a training process holds hundreds of thousands of
them once setup is done: torch's, transformers' and peft's modules, the model's modules and parameters, the
tokenizer, the dataset (460k on the CPU demo). Two costs followed from that, both measured:

- before the first step, setup's imports and loads set off full collections over a growing heap: 7 of them on the
  CPU demo, 0.90-0.94 s of a 4.4-5.4 s setup (without them, setup took 0.95 s less: three runs each, alternating);
- in the loop, a full collection that met a step doubled it: on the 8B QLoRA run at one row (host-bound), steps of
  0.42-0.66 s had outliers of 1.0 s, and with the collector off the median step was 9% faster (BENCHMARKS.md).

So, for one run (`SetupCollector`, entered before torch's import):

1. during setup, no full collection (the young generations are still collected, which is where most cyclic
   garbage dies). Python 3.14's incremental collector ignores the threshold this sets: there, nothing changes;
2. at the second step, once its update is queued and while the device runs it (the host would only wait), one
   full collection and then `gc.freeze()`: what setup and the first step left alive (the optimiser's moments are
   made at the first update) is out of the collector's sight, and the loop's own objects are collected as usual,
   full collections included. The collection comes first so that no cycle holding a tensor stays frozen (at that
   point there were 30-80 garbage objects on the CPU demo, none of them a tensor). Not at the first step: that
   step is settled before the next one is launched (its line is the first sign of life), and its host side is
   slow (first calls, kernel compiles), so the device has little or nothing left to run by then and the
   collection (0.3-0.4 s on the GPU machine) would only delay the first step's line. ("Second" counts steps that
   counted: after a skipped non-finite step the freeze waits one more);
3. after the loop, whether or not it reached a step, `thaw`: the frozen objects are visible again and the
   thresholds are the caller's (the end of a run saves, merges, evaluates, and may drop the model, whose cycles --
   a layer's forward bound to the layer -- need the collector). The same again on the way out, however the run
   ends.
"""

from __future__ import annotations

import gc

NO_FULL_COLLECTION = 1 << 30  # the oldest generation's threshold while setup runs: never reached


class SetupCollector:
    """One run's handling of the collector: a context for the whole run (setup and loop), `freeze_setup` at the
    second step, `thaw` after the loop. Where the caller had frozen objects of its own before the run, nothing is
    frozen (`gc.unfreeze` could not tell theirs from the run's, and the run's model would stay frozen, never
    collected, after the run); setup still runs without full collections."""

    def __init__(self):
        self._thresholds = gc.get_threshold()
        self._caller_froze = False
        self._set_up = False  # freeze_setup has run
        self._frozen = False  # this run's objects are frozen now

    def __enter__(self) -> SetupCollector:
        self._thresholds = gc.get_threshold()
        self._caller_froze = gc.get_freeze_count() > 0
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NO_FULL_COLLECTION)
        return self

    def freeze_setup(self) -> None:
        """Once a run (later calls do nothing): collect, freeze, and the caller's thresholds back for the loop.
        Where the update is queued on the device this overlaps the step's device work; elsewhere (the CPU, FSDP,
        GradScaler) the collection is part of that step's time."""
        if self._set_up:
            return
        self._set_up = True
        gc.collect()
        if not self._caller_froze:
            self._frozen = True  # before the freeze: an interrupt right after it must still find it undone
            gc.freeze()
        gc.set_threshold(*self._thresholds)

    def thaw(self) -> None:
        """After the loop, whether or not it reached a step: nothing of the run's frozen, the caller's thresholds."""
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        gc.set_threshold(*self._thresholds)

    def __exit__(self, *exc) -> None:
        self.thaw()
