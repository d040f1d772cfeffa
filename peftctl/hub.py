"""The hub, for offline clusters and for publishing: `fetch` fills the local caches so that `train` runs with
HF_HUB_OFFLINE=1, and `push` uploads an adapter (or a merged model) with a model card made from the run.

Tokens come from the environment (HF_TOKEN) or the login cache, through huggingface_hub: never from a recipe, and
never printed. The hub calls are passed in as functions so that tests can stand in for the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftctl.errors import InvalidInput, PeftctlError, class_names, first_line, hub_failure

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def is_local(name: str) -> bool:
    """After the recipe's paths are resolved, local models and datasets are absolute paths; anything else is a
    hub id."""
    return os.path.isabs(name)


@dataclass
class FetchReport:
    model: str | None = None
    model_path: str | None = None
    datasets: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # local paths: nothing to fetch


def fetch(recipe, *, snapshot_download=None, load_dataset=None, say=print) -> FetchReport:
    """Download the recipe's model (config, weights, tokenizer) and datasets into the local caches."""

    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    if load_dataset is None:
        from datasets import load_dataset
    report = FetchReport()
    model = recipe.model
    if is_local(model.name):
        report.skipped.append(model.name)
    else:
        say(f"fetching model {model.name}" + (f" at {model.revision}" if model.revision else ""))
        report.model = model.name
        report.model_path = str(_hub_call(lambda: snapshot_download(repo_id=model.name, revision=model.revision,
                                                                    allow_patterns=MODEL_PATTERNS), model.name))
    dataset = recipe.dataset
    specs = [(s.path, s.split) for s in dataset.sources()]
    if isinstance(dataset.validation, str):
        specs.append((dataset.validation, "validation"))
    for path, split in specs:
        if is_local(path):
            report.skipped.append(path)
            continue
        say(f"fetching dataset {path} [{split}]")
        _hub_call(lambda path=path, split=split: load_dataset(path, split=split), path)
        report.datasets.append(f"{path}[{split}]")
    return report


def _hub_call(call, name: str):
    """Gated, private or missing repositories are the user's to fix (exit 2, with the next step); a network that
    fails is not (exit 1)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - classified by name: these classes moved between hub releases
        kind, text = hub_failure(e), first_line(e)
        if kind == "gated":
            raise InvalidInput(f"{name} is gated: {text}", hint=f"accept its terms on https://huggingface.co/{name}, "
                               "then log in with `hf auth login` (or set HF_TOKEN)") from e
        if kind == "missing":
            raise InvalidInput(f"{name} not found on the hub (or private): {text}",
                               hint="check the id and revision; a private repository needs `hf auth login` "
                                    "with a token that can read it") from e
        if "HfHubHTTPError" in class_names(e) and ("401" in text or "403" in text):
            raise InvalidInput(f"{name}: the hub refused the token ({text})",
                               hint="log in again with `hf auth login`, or set HF_TOKEN to a valid token") from e
        if kind in ("network", "not_cached") or isinstance(e, OSError):
            raise PeftctlError(f"{name}: could not reach the hub ({text})",
                               hint="check the network (and HF_ENDPOINT / proxies); unset HF_HUB_OFFLINE to fetch") \
                from e
        raise


def model_card(run_dir: Path, repo_id: str, *, merged: bool) -> str:
    """A README.md for the hub from run.json and the resolved recipe."""
    manifest = json.loads((run_dir / "run.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    method = manifest.get("method", {})
    model = manifest.get("model", {})
    base = model.get("name", "")
    base_ref = base if not os.path.isabs(base) else Path(base).name
    data = manifest.get("data", {}).get("train", {})
    final = manifest.get("final") or {}
    front = {"base_model": base_ref, "library_name": "transformers" if merged else "peft",
             "tags": ["peftctl", method.get("name", "")] + ([] if merged else ["lora"] if "lora" in
                                                           method.get("name", "") else []),
             "license": "other"}
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("name", "can_merge") and v is not None)
    usage = (f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("
             f"\"{repo_id}\")" if merged else
             f"from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained("
             f"\"{repo_id}\")")
    if method.get("name") == "adapter":
        usage = f"# a bottleneck adapter in peftctl's own format: load it with peftctl\npeftctl generate {repo_id}"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"{'A merged model' if merged else 'An adapter'} trained with [peftctl](https://github.com/) on "
        f"`{base_ref}`: {method.get('name')} ({settings}).", "",
        "## Training", "",
        f"- quantisation of the base: {model.get('quantization') or 'none'}",
        f"- steps: {manifest.get('steps_done')} ({manifest.get('tokens_seen', 0):,} tokens); examples: "
        f"{data.get('examples', 0):,}, truncated {data.get('truncated', 0)}, "
        f"bad rows skipped {data.get('bad_rows', 0)}",
        f"- final training loss: {final.get('train_loss')}; validation loss: {final.get('eval_loss')}",
        f"- trainable parameters: {manifest.get('params', {}).get('trainable', 0):,} of "
        f"{manifest.get('params', {}).get('total', 0):,}",
        f"- device: {manifest.get('device')}; versions: "
        + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items() if v), "",
        "## Use", "", "```python", usage, "```", "",
        "## Recipe", "", "```yaml", yaml.safe_dump(_public(recipe), sort_keys=False).strip(), "```", "",
    ]
    return "\n".join(lines)


def _public(recipe: dict) -> dict:
    """The recipe without this machine's absolute paths (folder names only)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return Path(value).name
        return value
    return clean(recipe)


def push(run_dir: Path, repo_id: str, *, merged: bool = False, private: bool = False, api=None, say=print) -> str:
    """Upload RUN/adapter (or RUN/merged) with a generated model card; returns the repository's URL."""
    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists() is False and (run_dir.parent / "run.json").exists():
        run_dir = run_dir.parent  # RUN/adapter given
    folder = run_dir / ("merged" if merged else "adapter")
    if not (run_dir / "run.json").exists() or not folder.is_dir():
        what = "merged/ (train with output.merge: true, or run `peftctl merge`)" if merged else "adapter/"
        raise InvalidInput(f"{run_dir}: not a finished run folder with {what}")
    status = json.loads((run_dir / "run.json").read_text()).get("status")
    if status != "completed":
        raise InvalidInput(f"{run_dir}: the run's status is {status!r}, not completed",
                           hint="finish it with `peftctl train RECIPE --resume auto` first")
    if "/" not in repo_id:
        raise InvalidInput(f"{repo_id}: a repository id is owner/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    card = model_card(run_dir, repo_id, merged=merged)
    say(f"creating {repo_id}" + (" (private)" if private else ""))
    _hub_call(lambda: api.create_repo(repo_id=repo_id, private=private, exist_ok=True), repo_id)
    say(f"uploading {folder}")
    _hub_call(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                        commit_message=f"peftctl: upload {'merged model' if merged else 'adapter'}"),
              repo_id)
    _hub_call(lambda: api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id,
                                      commit_message="peftctl: model card"), repo_id)
    return f"https://huggingface.co/{repo_id}"
