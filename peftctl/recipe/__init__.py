"""Recipes: the YAML schema, safe loading with line marks, and --set overrides. Imports neither torch nor
transformers, so `validate`, `init` and `schema` stay instant."""
