"""The merge's arguments and inputs, all checked before any weight is read."""

from __future__ import annotations

import re
from pathlib import Path

from peftctl.adapter_folder import adapter_in
from peftctl.errors import InvalidInput, ModelNotFound
from peftctl.merge.common import TOKENIZER_FILES

# peft config features whose saved tensors this merge does not fold (refused rather than silently dropped).
UNSUPPORTED_FEATURES = ("modules_to_save", "layer_replication", "use_qalora", "lora_bias",
                        "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


def adapter_folder(path: Path) -> Path:
    """RUN/ or RUN/adapter -> the adapter folder; anything else as it is, for the checks that follow to word."""
    path = path.absolute()
    return (adapter_in(path) if path.is_dir() else None) or path


def mergeable(adapter_dir: Path) -> tuple[str, dict]:
    from peftctl.methods.registry import METHODS
    from peftctl.methods.runtime import adapter_kind

    method, config = adapter_kind(adapter_dir)
    spec = METHODS.get(method)
    if spec is None:
        raise InvalidInput(f"{adapter_dir}: a {method} adapter; peftctl merges lora (and DoRA, rsLoRA) and ia3",
                           hint="merge it with peft (PeftModel.from_pretrained(...).merge_and_unload())")
    if not spec.can_merge:
        raise InvalidInput(f"{adapter_dir}: {method} adapters cannot be merged: {spec.cannot_merge}",
                           hint=spec.instead_of_merge or None)
    used = [name for name in UNSUPPORTED_FEATURES if config.get(name) not in (None, False, [], {})]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        used.append(f"init_lora_weights={init} (changes the base weights)")
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']}")
    if used:
        raise InvalidInput(f"{adapter_dir}: peftctl merge does not fold adapters that use {', '.join(used)}",
                           hint="merge it with peft (PeftModel.from_pretrained(...).merge_and_unload())")
    return method, config


def parse_shard_size(value: int | str) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2, as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise InvalidInput(f"--max-shard-size {value}: expected a size like 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "B").upper()
        powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
                  "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        size = int(float(match.group(1)) * powers[unit])
    if size <= 0:
        raise InvalidInput(f"--max-shard-size {value}: must be positive")
    return size


def resolve_base(name: str, revision: str | None) -> Path:
    """A local folder as is; a hub id through the hub cache (config and safetensors files only)."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{name}: not a model folder (no config.json)",
                                hint="--base takes the folder that holds config.json and the weights")
        return path.absolute()
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise ModelNotFound(f"base model {name}: no such folder", hint="pass --base with the model folder")
    from huggingface_hub import snapshot_download

    from peftctl.model import from_pretrained

    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                *TOKENIZER_FILES]
    return Path(from_pretrained(snapshot_download, name, "model", revision=revision, allow_patterns=patterns))


def check_out_dir(out_dir: Path, adapter_dir: Path, base_folder: Path) -> None:
    out = out_dir.resolve()
    for what, other in (("adapter", adapter_dir.resolve()), ("base model", base_folder.resolve())):
        if out == other or out in other.parents or other in out.parents:
            raise InvalidInput(f"--out {out_dir} overlaps the {what} folder {other}",
                               hint="write the merged model to a folder of its own")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"--out {out_dir} is a file")
