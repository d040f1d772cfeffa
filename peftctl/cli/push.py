"""`peftctl push RUN_DIR REPO_ID`: upload the adapter (or the merged model) with a model card from the run."""

from __future__ import annotations


def run(run_dir: str, repo_id: str, *, merged: bool, private: bool) -> int:
    from pathlib import Path

    from rich.console import Console

    from peftctl.hub import push

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    url = push(Path(run_dir), repo_id, merged=merged, private=private,
               say=lambda m: console.print(m, markup=False))
    print(url)
    return 0
