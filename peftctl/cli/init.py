"""`peftctl init`: print a commented starter recipe."""

from __future__ import annotations

import sys

from peftctl.errors import InvalidInput


def run(method: str, model: str) -> None:
    from peftctl.methods.registry import METHODS
    from peftctl.recipe.starter import starter_recipe

    if method not in METHODS:
        raise InvalidInput(f"--method {method}: unknown method", hint=f"one of: {', '.join(METHODS)}")
    sys.stdout.write(starter_recipe(method, model))
