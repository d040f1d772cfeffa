"""The base of every recipe section: unknown keys are errors, never silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are valid YAML floats but no training value; refuse them at validation
    model_config = ConfigDict(extra="forbid", validate_assignment=False, use_attribute_docstrings=False,
                              allow_inf_nan=False)

    def problems(self) -> list[tuple[tuple, str]]:
        """Rules that involve several keys of this section: (path inside the section, message) pairs."""
        return []

    def explicitly_set(self, key: str) -> bool:
        return key in self.model_fields_set


class MethodSection(Section):
    """What every method's recipe section has besides its own keys."""

    init_from: str | None = Field(None, description="Start from an existing adapter folder (ours, or any peft "
                                  "adapter for the same base) instead of a fresh one; it must fit this method and "
                                  "its settings. Continue a stopped run with --resume instead.")
