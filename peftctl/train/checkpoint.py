"""Resumable checkpoints: everything needed to continue a run exactly, with a manifest of hashes written last.

A checkpoint folder is built under a temporary name and renamed into `checkpoints/step_000120`; its manifest
(each file's SHA-256) is the last file written, so a folder without a manifest, or with a file that does not match
its hash, is not a checkpoint. Old checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from peftctl.errors import InvalidInput, PeftctlError
from peftctl.files import staged_dir

MANIFEST = "manifest.json"
PREFIX = "step_"

# Keys that change what is trained: a resume that changes one of them would not continue the same run.
TRAINED_KEYS = {
    "model": None, "quantization": None, "method": None, "dataset": None,
    "training": ("seed", "micro_batch_size", "gradient_accumulation", "learning_rate", "lr_scheduler",
                 "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm"),
}


class DamagedCheckpoint(PeftctlError):
    pass


@dataclass
class TrainerState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    nonfinite_skipped: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


def name_for(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def estimate_bytes(weights: dict) -> int:
    """Adapter weights plus two Adam moments, all float32, plus a little for the rest."""
    params = sum(t.numel() for t in weights.values())
    return params * 4 * 3 + (1 << 20)


def rng_snapshot() -> tuple:
    """Every random stream of this process (python, numpy, torch, CUDA) as it stands, cheaply: the loop takes one
    before it launches a step ahead of the previous step's checkpoint (train/loop.py)."""
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rng_state(snapshot: tuple | None = None) -> dict:
    """Every random stream of this process (python, numpy, torch, CUDA) -- now, or as `rng_snapshot` took them --
    as JSON-ready values."""
    python, np_state, cpu, cuda = snapshot if snapshot is not None else rng_snapshot()
    return {
        "python": _jsonable(python),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": cpu.tolist(),
        "cuda": [s.tolist() for s in cuda],
    }


def restore_rng(rng: dict) -> None:
    import numpy as np
    import torch

    random.setstate(_tuples(rng["python"]))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def save(root: Path, weights: dict, optimizer_state: dict, scheduler, state: TrainerState, recipe_yaml: str,
         data_fingerprint: str, keep: int, *, rngs: list[dict] | None = None, world_size: int = 1,
         engine: str | None = None) -> Path:
    """Write checkpoints/step_N from the full trainable weights and optimiser state (gathered by the caller, on
    every rank when they are sharded); `rngs` holds every rank's random streams (this process's when None)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    need = estimate_bytes(weights)
    free = shutil.disk_usage(root).free
    if free < need * 1.2:
        raise PeftctlError(f"not enough disk space for a checkpoint in {root}: {free / 2**20:.0f} MiB free, about "
                           f"{need / 2**20:.0f} MiB needed", hint="free space or move output.dir; the previous "
                           "checkpoint is intact and `--resume auto` continues from it")
    bad = [name for name, t in weights.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise PeftctlError(f"the adapter weights at step {state.step} are not finite (e.g. {bad[0]}): no checkpoint "
                           f"written, the earlier ones in {root} are intact",
                           hint="lower training.learning_rate or training.weight_decay, keep training.max_grad_norm "
                                "set, then --resume auto from the last good checkpoint")
    final = root / name_for(state.step)
    with staged_dir(final) as tmp:
        save_file(weights, str(tmp / "adapter_state.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=_no_callables))
        rngs = rngs or [rng_state()]
        (tmp / "rng.json").write_text(json.dumps({**rngs[0], "ranks": rngs if len(rngs) > 1 else None}))
        (tmp / "trainer_state.json").write_text(json.dumps({**state.__dict__, "data_fingerprint": data_fingerprint,
                                                            "world_size": world_size, "engine": engine}, indent=2))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": state.step, "files": files}, indent=2))
    prune(root, keep, best_step=state.best_step)
    return final


def prune(root: Path, keep: int, *, best_step: int | None = None) -> None:
    """Keep the newest `keep` checkpoints (and the best one, when the run keeps it); remove the rest."""
    valid = [p for p in list_checkpoints(root) if (p / MANIFEST).exists()]
    best = name_for(best_step) if best_step is not None else None
    for old in valid[:-keep] if keep > 0 else []:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(f".{PREFIX}*"):  # temporary folders of an interrupted save
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (those without a manifest included; `verify` rejects them)."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path) -> dict:
    """The manifest of a checkpoint whose every file matches its hash; DamagedCheckpoint otherwise."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise DamagedCheckpoint(f"{path} has no manifest (an interrupted save): not a checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"{path}: damaged manifest ({e})") from None
    for name, digest in files.items():
        file = path / name
        if not file.exists():
            raise DamagedCheckpoint(f"{path}: {name} is missing")
        if _sha256(file) != digest:
            raise DamagedCheckpoint(f"{path}: {name} does not match its hash (truncated or altered)")
    _check_weights(path / "adapter_state.safetensors")
    return manifest


def _check_weights(path: Path) -> None:
    """A checkpoint is good only if its weights are finite, and only if they are safetensors (no pickle)."""
    import torch
    from safetensors.torch import load_file

    if not path.exists():
        return
    try:
        weights = load_file(str(path))
    except Exception:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
        raise DamagedCheckpoint(f"{path} is not a valid checkpoint file (not safetensors)") from None
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DamagedCheckpoint(f"{path.parent}: non-finite adapter weights (e.g. {bad[0]}): not a good state")


def find_resumable(root: Path, requested: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes on damaged ones skipped; for "auto", the newest good one."""
    notes: list[str] = []
    if requested != "auto":
        path = Path(requested)
        if not path.is_dir():
            raise InvalidInput(f"--resume {requested}: no such checkpoint folder")
        try:
            verify(path)
        except DamagedCheckpoint as e:
            raise InvalidInput(f"--resume: {e.message}", hint="use --resume auto to take the newest good "
                               "checkpoint") from None
        return path, notes
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path, notes
        except DamagedCheckpoint as e:
            notes.append(f"skipping {path.name}: {e.message}")
    return None, notes


def load(path: Path, model, optimizer, scheduler, *, rank: int = 0, engine: str | None = None
         ) -> tuple[TrainerState, dict]:
    import torch

    from peftctl.train.distributed import load_optimizer_state

    raw = json.loads((path / "trainer_state.json").read_text())
    if raw.get("engine") != engine:
        raise InvalidInput(f"{path} was written under {raw.get('engine') or 'one process'}, this run uses "
                           f"{engine or 'one process'}: the optimiser state is not stored the same way",
                           hint="resume with the same training.distributed and number of processes")
    load_adapter_weights(path, model, verified=True)
    try:
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - pickle errors come in many types; none may suggest weights_only=False
        raise InvalidInput(f"{path / 'optimizer.pt'} is not a valid checkpoint file (it holds more than "
                                "tensors and plain values, or is damaged): nothing in it was run",
                                hint="resume from another checkpoint (--resume auto skips damaged ones), or start "
                                     "again with --force") from None
    load_optimizer_state(model, optimizer, optimizer_state, engine)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = json.loads((path / "rng.json").read_text())
    ranks = rng.get("ranks") or [rng]
    restore_rng(ranks[rank] if rank < len(ranks) else ranks[0])
    state = TrainerState(**{k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__})
    return state, raw


def load_adapter_weights(path: Path, model, *, verified: bool = False) -> None:
    """Put a checkpoint's adapter weights into the model (resume; keep_best: adapter/ from the best step)."""
    from safetensors.torch import load_file

    from peftctl.train.distributed import load_trainable_state

    if not verified:
        verify(path)
    weights = load_file(str(path / "adapter_state.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing or any(name not in params for name in weights):
        raise InvalidInput(f"{path}: the checkpoint's adapter does not match this model "
                           f"(e.g. {(missing or list(weights))[0]})")
    load_trainable_state(model, weights)


def recipe_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes to what is trained, other changes) between two resolved recipes, as 'key: old -> new' lines."""
    trained, cadence = [], []
    for key in sorted(set(_flatten(old)) | set(_flatten(new))):
        a, b = _flatten(old).get(key), _flatten(new).get(key)
        if a == b:
            continue
        section, _, field = key.partition(".")
        line = f"{key}: {a!r} -> {b!r}"
        scope = TRAINED_KEYS.get(section, ())
        if section in TRAINED_KEYS and (scope is None or field.split(".")[0] in scope):
            trained.append(line)
        else:
            cadence.append(line)
    return trained, cadence


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = d
    return out


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _no_callables(value):
    return None
