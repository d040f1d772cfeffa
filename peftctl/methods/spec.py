"""What a PEFT method is and what it can do: one `MethodSpec` per method, defined in the method's own module.

What a method cannot do is stored as the reason it cannot, so validation, `merge` and the docs all give the same
explanation. This module imports nothing from peftctl.methods, so every method module can import it, and the
registry (which imports every method module) or runtime can be imported first: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from peftctl.recipe.base import Section


@dataclass(frozen=True)
class MethodSpec:
    name: str
    section: type[Section]
    updates: str  # what the method trains, in a few words (README table, count-params)
    peft_type: str | None  # peft's name for it; None for our own bottleneck adapters
    cannot_merge: str | None = None  # the reason it cannot be merged into the base weights, if it cannot
    cannot_pack: str | None = None
    cannot_checkpoint: str | None = None  # why gradient checkpointing is refused
    cannot_4bit: str | None = None  # why it cannot train on a quantised (4- or 8-bit) base
    instead_of_merge: str = ""  # what to do when a merge is refused

    @property
    def can_merge(self) -> bool:
        return self.cannot_merge is None

    @property
    def can_pack(self) -> bool:
        return self.cannot_pack is None

    @property
    def can_checkpoint(self) -> bool:
        return self.cannot_checkpoint is None

    @property
    def works_on_4bit(self) -> bool:
        return self.cannot_4bit is None

    @property
    def prompt_learning(self) -> bool:
        return self.name in ("prefix_tuning", "prompt_tuning", "p_tuning")

    def implementation(self) -> ModuleType:
        """The module with `attach`, `save` and `load` (imported on first use; it may import torch lazily)."""
        import importlib

        return importlib.import_module(self.section.__module__)
