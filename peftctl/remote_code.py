"""Whose code runs: a model repository's own Python code (transformers' `trust_remote_code`) runs only when the
user asks on the command line or in their recipe, never because a downloaded adapter says so.

An adapter folder may come from anyone; its `peftctl_adapter.json` records whether its base needed remote code,
but that record is used only to say "this base needs --trust-remote-code", never to switch the code on.
"""

from __future__ import annotations

import os

from peftctl.errors import InvalidInput

FLAG = "--trust-remote-code"


class RemoteCodeRefused(InvalidInput):
    """The model needs its own code and the user did not allow it."""


def is_refusal(e: BaseException) -> bool:
    """transformers' ValueError for a repository with custom code loaded without trust_remote_code."""
    return isinstance(e, ValueError) and "trust_remote_code=True" in str(e)


def refusal(name: str, *, recorded: bool = False) -> RemoteCodeRefused:
    why = " (the adapter was trained with trust_remote_code)" if recorded else ""
    return RemoteCodeRefused(f"{name} needs its own Python code to load{why}; peftctl runs it only when you ask",
                             hint=f"if you have read that code and trust it, pass {FLAG} (generate, merge) or set "
                                  "model.trust_remote_code: true in the recipe; for a hub id pin the revision "
                                  "you reviewed")


def check_pinned(name: str, revision: str | None, trusted: bool) -> None:
    """The recipe's rule for the command line: remote code from the hub only at a pinned revision (a moving branch
    could bring different code tomorrow)."""
    if trusted and not revision and not os.path.isdir(name):
        raise InvalidInput(f"{FLAG}: {name} is a hub id with no pinned revision, so the code that would run is "
                           "whatever the repository holds today",
                           hint="use an adapter trained with model.revision pinned to a commit you reviewed, or "
                                "download the base and pass its folder (--base for merge)")
