"""The base of every recipe section: unknown keys are errors, never silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, use_attribute_docstrings=False)

    def problems(self) -> list[tuple[tuple, str]]:
        """Rules that involve several keys of this section: (path inside the section, message) pairs."""
        return []

    def explicitly_set(self, key: str) -> bool:
        return key in self.model_fields_set
