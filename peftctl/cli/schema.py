"""`peftctl schema`: the recipe's JSON Schema, for editors (yaml-language-server) and CI checks."""

from __future__ import annotations

import json


def run() -> None:
    from peftctl.recipe.schema import Recipe

    schema = Recipe.model_json_schema()
    schema = {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "peftctl recipe"}
    print(json.dumps(schema, indent=2))
