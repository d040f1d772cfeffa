"""`peftctl eval TARGET... --data FILE`: base and adapters side by side on held-out data.

stdout carries the table (or, with --json, one JSON object); progress notes go to stderr. --out writes every
example's prompt, reference and each target's prediction as JSON Lines.
"""

from __future__ import annotations

import json
import sys

from peftctl.errors import InvalidInput


def run(targets: list[str], *, data: str, format: str | None, fields: list[str], metrics: list[str],
        max_new_tokens: int, batch_size: int, max_length: int | None, limit: int | None, json_output: bool,
        out: str | None, force: bool, bootstrap: int, seed: int, trust_remote_code: bool = False) -> int:
    from rich.console import Console

    from peftctl.eval.evaluate import EvalOptions, evaluate
    from peftctl.eval.report import check_out_path, table, write_predictions

    out_path = check_out_path(out, force) if out else None  # before any model loads
    options = EvalOptions(data=data, format=format, fields=parse_fields(fields), metrics=metrics or None,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, limit=limit,
                          bootstrap=bootstrap, seed=seed, predictions=out is not None,
                          trust_remote_code=trust_remote_code)
    err = Console(stderr=True, highlight=False)
    result = evaluate(targets, options, report=lambda line: err.print(line, markup=False))
    if out_path is not None:
        write_predictions(out_path, result)
    if json_output:
        sys.stdout.write(json.dumps(result.summary, indent=2) + "\n")
    else:
        Console(highlight=False).print(table(result.summary))
    return 0


def parse_fields(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise InvalidInput(f"--field {item!r}: expected NAME=COLUMN, e.g. --field output=answer")
        out[name.strip()] = column.strip()
    return out
