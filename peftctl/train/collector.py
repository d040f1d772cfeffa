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
   garbage dies);
2. at the first step, while the device runs it and the host would only wait, one full collection and then
   `gc.freeze()`: what setup left alive is out of the collector's sight, and the loop's own objects are collected
   as usual, full collections included. The collection comes first so that no cycle holding a tensor stays frozen
   (at that point there were 30-80 garbage objects on the CPU demo, none of them a tensor);
3. after the loop, `thaw`: the frozen objects are visible again (the end of a run may drop the model, and a
   model's cycles -- a layer's forward bound to the layer -- need the collector). The thresholds are the caller's
   again on the way out, however the run ends.
"""

from __future__ import annotations

import gc

NO_FULL_COLLECTION = 1 << 30  # the oldest generation's threshold while setup runs: never reached


class SetupCollector:
    """One run's handling of the collector: a context for the whole run (setup and loop), `freeze_setup` at the
    first step, `thaw` after the loop. A caller's own frozen objects (frozen before the run) stay frozen: `gc.unfreeze`
    cannot tell whose they are, so it is not called then."""

    def __init__(self):
        self._thresholds = gc.get_threshold()
        self._frozen_before = 0
        self._frozen = False

    def __enter__(self) -> SetupCollector:
        self._thresholds = gc.get_threshold()
        self._frozen_before = gc.get_freeze_count()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NO_FULL_COLLECTION)
        return self

    def freeze_setup(self) -> None:
        """Once a run (later calls do nothing): collect, freeze, and the caller's thresholds back for the loop."""
        if self._frozen:
            return
        gc.collect()
        gc.freeze()
        gc.set_threshold(*self._thresholds)
        self._frozen = True

    def thaw(self) -> None:
        if self._frozen and not self._frozen_before:
            gc.unfreeze()
        self._frozen = False

    def __exit__(self, *exc) -> None:
        self.thaw()
        gc.set_threshold(*self._thresholds)
