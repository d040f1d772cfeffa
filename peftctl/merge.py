"""`peftctl merge`: fold an adapter into its base model, one shard at a time, and prove the result.

Read `merge_adapter` from top to bottom. The base is never loaded whole: its safetensors shards are read shard by
shard and tensor by tensor (`safe_open` hands out views of the mapped file, released when the tensor is dropped),
every tensor that an adapter touches gets its delta in float32, and each tensor is streamed into an output shard
whose header was planned up front from the base's own headers. Peak memory is therefore a few tensors plus the
adapter while merging, and about one decoder layer while verifying, whatever the model's size.

What a merge does to one weight W (shape (out, in); GPT-2's Conv1D stores (in, out) and is transposed around it):
  LoRA, rsLoRA   W + s * B @ A             s = alpha / r (rsLoRA: alpha / sqrt(r)); r = A.shape[0]
  DoRA           m / ||V||_row * V         V = W + s * B @ A, m the learned magnitude per output row
  IA3            W * l                     l scales input columns (feed-forward targets) or output rows (+ bias)
For an adapter trained on a quantised base, W is first quantised and dequantised exactly as bitsandbytes did when
the base was loaded for training (default, `dequantized`): only that reproduces the function that was trained.
`original` merges onto the unquantised weights and is off by one quantisation error. Nothing is merged into 4-bit
weights. 8-bit bases: W becomes bitsandbytes' int8 weight dequantised (row-wise absmax / 127); bitsandbytes also
quantises activations at run time in 8-bit layers, which no merged model can reproduce (the note says so).

Verification streams a few token sequences through the model one decoder layer at a time, loading each layer's
weights from shards just before it runs and dropping them after: once through peft's own adapter layers over the
base weights (the reference, computed independently of the merge arithmetic above), once with them disabled (the
base), and once through the merged shards as written. Everything computes in float32, so the difference measures
the merge and the output dtype's rounding, nothing else. A merge fails with exit code 1, leaving nothing at --out,
when its logits differ from base + adapter by more than the output dtype's tolerance (or, before rounding to a
half-precision dtype, by more than float32 noise), when it equals the base model (an adapter that does nothing),
or when rounding to the output dtype lost most of what the adapter changes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from peftctl.errors import EXIT_SIGTERM, InvalidInput, ModelNotFound, PeftctlError
from peftctl.generation_config import write_into_merged as write_generation_config

MERGE_INFO = "peftctl_merge.json"
ADAPTER_INFO = "peftctl_adapter.json"  # written by train/loop.py beside peft's files
FROM_QUANTIZED = ("dequantized", "original")
OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
# Largest logit difference between merged and base + adapter, relative to the largest reference logit. float32 is
# rounding noise (measured ~1e-7 on tiny models); half-precision outputs round every merged weight (bf16 keeps 8
# bits of mantissa, fp16 11), which on random tiny models moves logits by up to ~2e-2 (bf16) and ~2e-3 (fp16);
# the merge arithmetic itself is then checked before rounding, at the float32 tolerance.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
MIN_EFFECT = 1e-6  # relative: below this the merged model is the base model, whatever the dtype
VERIFY_SEQUENCES, VERIFY_TOKENS = 4, 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "vocab.txt", "spiece.model")
# peft config features whose saved tensors this merge does not fold (refused rather than silently dropped).
UNSUPPORTED_FEATURES = ("modules_to_save", "layer_replication", "target_parameters", "use_qalora", "lora_bias",
                        "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


@dataclass
class MergeReport:
    out_dir: str
    adapter_dir: str
    method: str
    base: str
    base_revision: str | None
    base_folder: str
    dtype: str
    quantization: dict | None
    from_quantized: str | None  # None: the adapter was trained on an unquantised base
    tensors_merged: int = 0
    shards: int = 0
    verification: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        import peftctl

        return {"peftctl_version": peftctl.__version__, **asdict(self)}


class VerificationFailed(PeftctlError):
    """The merged model does not compute what base + adapter computes (exit 1; nothing is written)."""


class MergeStopped(PeftctlError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def merge_adapter(adapter_dir, out_dir, *, base: str | None = None, dtype: str | None = None, verify: bool = True,
                  max_shard_size: int | str = "5GB", from_quantized: str = "dequantized", force: bool = False,
                  report: Callable[[str], None] | None = None, trust_remote_code: bool = False) -> MergeReport:
    """Merge the adapter in `adapter_dir` (an adapter folder or a run folder) into its base; write `out_dir`."""
    say = report or (lambda message: None)
    t_start = time.time()

    # Everything that can be wrong with the arguments is checked before any weight is read.
    adapter_dir = _adapter_folder(Path(adapter_dir))
    method, config = _mergeable(adapter_dir)
    info = _adapter_info(adapter_dir)
    if from_quantized not in FROM_QUANTIZED:
        raise InvalidInput(f"--from-quantized {from_quantized}: expected dequantized or original")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InvalidInput(f"--dtype {dtype}: expected {', '.join(OUTPUT_DTYPES)}")
    shard_limit = parse_size(max_shard_size)
    base_name = base or info.get("base_model") or config.get("base_model_name_or_path")
    if not base_name:
        raise InvalidInput(f"{adapter_dir}: the adapter does not say which base model it was trained on",
                           hint="pass --base MODEL")
    revision = info.get("revision") if base is None else None
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise InvalidInput(f"--out {out_dir} already exists", hint="choose another folder, or replace it with --force")
    base_folder = resolve_base(base_name, revision)
    _check_out_dir(out_dir, adapter_dir, base_folder)
    quant = info.get("quantization")
    merge_report = MergeReport(out_dir=str(out_dir), adapter_dir=str(adapter_dir), method=info.get("method", method),
                               base=base_name, base_revision=revision, base_folder=str(base_folder), dtype="",
                               quantization=quant, from_quantized=from_quantized if quant else None)

    import torch

    from transformers import AutoConfig

    base_ckpt = Checkpoint(base_folder)
    base_config = json.loads((base_folder / "config.json").read_text())
    # The base's own code runs only when the caller (the user, on the command line) says so, never the adapter.
    trust = trust_remote_code
    model_config = AutoConfig.from_pretrained(str(base_folder), trust_remote_code=trust)
    if base_config.get("quantization_config"):
        raise InvalidInput(f"{base_folder} is a pre-quantised checkpoint; a merge needs the unquantised weights",
                           hint="pass --base with the original (bfloat16/float16/float32) model")
    out_dtype_name = dtype or base_ckpt.dtype_name(base_config)
    merge_report.dtype = out_dtype_name
    out_dtype = getattr(torch, out_dtype_name)

    say(f"reading the {method} adapter in {adapter_dir}")
    deltas = plan_deltas(adapter_dir, method, config, base_ckpt)
    transform = None
    if quant:
        # The dtype the base was loaded in for training is what bitsandbytes quantised.
        load_dtype = getattr(torch, info.get("dtype") if info.get("dtype") in OUTPUT_DTYPES
                             else base_ckpt.dtype_name(base_config))
        quant = {**quant, "load_dtype": load_dtype}
        if from_quantized == "dequantized":
            transform = weight_transform(quant, quantized_weights(model_config, quant, trust_remote_code=trust))
            merge_report.notes.append(_quant_note(quant))
        else:
            merge_report.notes.append(f"merged onto the original weights, not the {quant['bits']}-bit ones the "
                                      "adapter was trained on: off by about one quantisation error")

    with _stop_on_sigterm(), staging_dir(out_dir) as tmp:
        say(f"merging onto {base_name} ({len(base_ckpt.files)} shard(s)) in {out_dtype_name}")
        merge_report.shards, merge_report.tensors_merged = write_merged_shards(
            base_ckpt, tmp, deltas, transform, out_dtype, shard_limit, say)
        write_model_files(tmp, base_folder, adapter_dir, base_config, out_dtype_name)
        write_generation_config(tmp, adapter_dir)  # the adapter's stop tokens and pad id over the base's
        if verify:
            say("verifying: base + adapter against the merged shards, one layer at a time")
            merge_report.verification = verify_merge(base_ckpt, Checkpoint(tmp), adapter_dir, model_config,
                                                     out_dtype_name, quant, transform, deltas,
                                                     trust_remote_code=trust)
            merge_report.notes += merge_report.verification.pop("notes", [])
            check_verification(merge_report.verification, out_dir)
        merge_report.seconds = round(time.time() - t_start, 2)
        (tmp / MERGE_INFO).write_text(json.dumps(merge_report.as_dict(), indent=2) + "\n")
    return merge_report


# --- arguments and inputs ----------------------------------------------------------------------------------------


def _adapter_folder(path: Path) -> Path:
    """RUN/ or RUN/adapter -> the adapter folder."""
    path = path.absolute()
    if path.is_dir() and not (path / "adapter_config.json").exists() and (path / "adapter").is_dir():
        return path / "adapter"
    if path.is_dir() and (path / "run.json").exists() and not (path / "adapter").exists():
        raise InvalidInput(f"{path}: this run has no adapter yet (training did not finish)",
                           hint="finish or resume the run first: peftctl train RECIPE --resume auto")
    return path


def _mergeable(adapter_dir: Path) -> tuple[str, dict]:
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


def _adapter_info(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_INFO
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: damaged ({e})") from None


def parse_size(value: int | str) -> int:
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

    from peftctl.model import _from_pretrained

    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                *TOKENIZER_FILES]
    return Path(_from_pretrained(snapshot_download, name, "model", revision=revision, allow_patterns=patterns))


def _check_out_dir(out_dir: Path, adapter_dir: Path, base_folder: Path) -> None:
    out = out_dir.resolve()
    for what, other in (("adapter", adapter_dir.resolve()), ("base model", base_folder.resolve())):
        if out == other or out in other.parents or other in out.parents:
            raise InvalidInput(f"--out {out_dir} overlaps the {what} folder {other}",
                               hint="write the merged model to a folder of its own")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"--out {out_dir} is a file")


# --- safetensors checkpoints: reading, planning and writing shards -----------------------------------------------


class Checkpoint:
    """A model folder's safetensors weights: which file holds each tensor, with shapes and dtypes from the headers
    (reading a header maps no tensor data)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise InvalidInput(f"{index}: damaged index ({e})") from None
            names = list(dict.fromkeys(sorted(weight_map.values())))
        elif (self.folder / "model.safetensors").exists():
            names = ["model.safetensors"]
        else:
            raise InvalidInput(f"{self.folder}: no safetensors weights (model.safetensors or its index)",
                               hint="convert the base to safetensors first (save_pretrained does by default)")
        self.files: list[Path] = [self.folder / name for name in names]
        self.keys_of: dict[Path, list[str]] = {}
        self.file_of: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (safetensors dtype code, shape)
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    keys = list(f.keys())
                    for key in keys:
                        piece = f.get_slice(key)
                        self.meta[key] = (piece.get_dtype(), tuple(piece.get_shape()))
            except FileNotFoundError:
                raise InvalidInput(f"{path}: a shard named in the index is missing") from None
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
                raise InvalidInput(f"{path}: damaged safetensors file ({e})") from None
            self.keys_of[path] = keys
            self.file_of.update(dict.fromkeys(keys, path))

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][1]

    def dtype_name(self, config: dict) -> str:
        """The base's dtype: config.json's, else the dtype holding most of the floating-point weights."""
        named = config.get("dtype") or config.get("torch_dtype")
        if named in OUTPUT_DTYPES:
            return named
        totals: dict[str, int] = {}
        for code, shape in self.meta.values():
            if code in ("F32", "F16", "BF16"):
                totals[code] = totals.get(code, 0) + math.prod(shape)
        code = max(totals, key=totals.get) if totals else "F32"
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[code]

    def tensors(self, path: Path):
        """(key, tensor) for every tensor of one shard, one at a time. safetensors maps the file and hands out
        tensors that are views of the mapping, which lives while any of them does: opening the file per tensor
        keeps only the current tensor's pages in memory, not every page of the shard read so far."""
        for key in self.keys_of[path]:
            yield key, self.read([key])[key]

    def read(self, keys) -> dict:
        """The tensors `keys` (views of the mapped files, read on first touch)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in wanted:
                    out[key] = f.get_tensor(key)
        return out


@lru_cache(maxsize=None)
def _dtype_codes():
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ShardWriter:
    """One safetensors file written tensor by tensor: the header (every name, dtype, shape and offset) is known up
    front, so no tensor has to wait in memory for the others."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, code, shape, nbytes in entries:
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.entries, self.next = path, entries, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor) -> None:
        import torch

        name, code, shape, nbytes = self.entries[self.next]
        if key != name or tuple(tensor.shape) != shape or _dtype_codes()[tensor.dtype] != code:
            raise RuntimeError(f"{self.path.name}: expected {name} {code}{list(shape)}, got {key} "
                               f"{tensor.dtype}{list(tensor.shape)}")
        if nbytes:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self.file.write(memoryview(flat.numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"{self.path.name}: {len(self.entries) - self.next} tensor(s) never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def plan_output_shards(base: Checkpoint, out_dtype, limit: int) -> list[list[tuple[str, str, tuple, int]]]:
    """Output shards in the base's tensor order, each as large as `limit` allows (a larger tensor gets its own)."""
    import torch

    codes = _dtype_codes()
    sizes = {code: torch.empty(0, dtype=dt).element_size() for dt, code in codes.items()}
    out_code = codes[out_dtype]
    shards: list[list] = [[]]
    used = 0
    for path in base.files:
        for key in base.keys_of[path]:
            code, shape = base.meta[key]
            if code in ("F32", "F16", "BF16", "F64"):
                code = out_code
            nbytes = math.prod(shape) * sizes[code]
            if shards[-1] and used + nbytes > limit:
                shards.append([])
                used = 0
            shards[-1].append((key, code, shape, nbytes))
            used += nbytes
    return shards


def write_merged_shards(base: Checkpoint, out: Path, deltas: dict, transform, out_dtype, limit: int, say):
    """Stream every base tensor through `transform` (dequantisation) and its deltas into the output shards."""
    plan = plan_output_shards(base, out_dtype, limit)
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {key: i for i, entries in enumerate(plan) for key, *_ in entries}
    writer, current, merged = None, -1, 0
    try:
        for number, path in enumerate(base.files, 1):
            say(f"  shard {number}/{len(base.files)}: {path.name}")
            for key, tensor in base.tensors(path):
                index = shard_of[key]
                if index != current:
                    if writer is not None:
                        writer.close()
                    writer, current = ShardWriter(out / names[index], plan[index]), index
                if transform is not None:
                    tensor = transform(key, tensor)
                if key in deltas:
                    tensor = apply_deltas(tensor, deltas[key])
                    merged += 1
                if tensor.is_floating_point():
                    tensor = tensor.to(out_dtype)
                writer.write(key, tensor)
                del tensor  # dropped as soon as it is written
        if writer is not None:
            writer.close()
    finally:
        if writer is not None and not writer.file.closed:
            writer.file.close()
    if n > 1:
        total = sum(nbytes for entries in plan for *_, nbytes in entries)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in shard_of.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return n, merged


def write_model_files(out: Path, base_folder: Path, adapter_dir: Path, base_config: dict, dtype_name: str) -> None:
    """config.json (with the output dtype), generation_config.json, the base's own Python files (a model whose
    classes live in its folder, named by `auto_map`, loads only with them), and the tokenizer saved with the
    adapter (its chat template included), else the base's."""
    config = {k: v for k, v in base_config.items() if k != "quantization_config"}
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_folder / "generation_config.json").exists():
        shutil.copyfile(base_folder / "generation_config.json", out / "generation_config.json")
    for code in sorted(base_folder.glob("*.py")):  # all of them: a modeling file imports its configuration file
        shutil.copyfile(code, out / code.name)
    source = adapter_dir if any((adapter_dir / n).exists() for n in TOKENIZER_FILES) else base_folder
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)


# --- the adapter as deltas on checkpoint tensors -----------------------------------------------------------------


@dataclass
class Delta:
    """What one adapter does to one checkpoint tensor."""

    kind: str  # lora | dora | ia3 | ia3_bias
    fan_in_fan_out: bool = False
    scale: float = 1.0
    a: object = None  # (r, in)
    b: object = None  # (out, r)
    magnitude: object = None  # (out,)
    vector: object = None  # IA3: (1, in) feed-forward, (out, 1) otherwise
    feedforward: bool = False


def plan_deltas(adapter_dir: Path, method: str, config: dict, base: Checkpoint) -> dict[str, list[Delta]]:
    """checkpoint key -> its deltas; every adapter tensor must find a base tensor of a fitting shape."""
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise InvalidInput(f"{adapter_dir}: no adapter_model.safetensors",
                           hint="an adapter folder holds adapter_config.json and adapter_model.safetensors")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise InvalidInput(f"{weights}: damaged adapter weights ({e})") from None
    if not state:
        raise InvalidInput(f"{weights}: the adapter holds no tensors")
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|ia3_l)",
                             key)
        if not match:
            raise InvalidInput(f"{weights}: tensor {key} is of a kind peftctl merge does not fold",
                               hint="merge it with peft (PeftModel.from_pretrained(...).merge_and_unload())")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    deltas: dict[str, list[Delta]] = {}
    for module, parts in modules.items():
        key = f"{module}.weight"
        if key not in base.meta:
            raise InvalidInput(f"the base has no tensor {key}, which the adapter changes",
                               hint="check that --base is the model the adapter was trained on")
        if method == "ia3":
            new = _ia3_deltas(module, parts, config, fan_in_fan_out, base)
        else:
            new = [_lora_delta(module, parts, config, fan_in_fan_out)]
        for delta in new:
            target = key if delta.kind != "ia3_bias" else f"{module}.bias"
            _check_shape(target, delta, base.shape(target), adapter_dir)
            deltas.setdefault(target, []).append(delta)
    return deltas


def _lora_delta(module: str, parts: dict, config: dict, fan_in_fan_out: bool) -> Delta:
    if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
        missing = "lora_A" if "lora_A.weight" not in parts else "lora_B"
        raise InvalidInput(f"damaged adapter: {module} has no {missing} tensor")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise InvalidInput(f"damaged adapter: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}")
    r = a.shape[0]
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key: the first match wins
            alpha = value
            break
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = parts.get("lora_magnitude_vector")
    if config.get("use_dora") and magnitude is None:
        raise InvalidInput(f"damaged adapter: the DoRA adapter has no magnitude vector for {module}")
    return Delta(kind="dora" if magnitude is not None else "lora", fan_in_fan_out=fan_in_fan_out, scale=scale,
                 a=a, b=b, magnitude=magnitude)


def _ia3_deltas(module: str, parts: dict, config: dict, fan_in_fan_out: bool, base: Checkpoint) -> list[Delta]:
    vector = parts.get("ia3_l")
    if vector is None:
        raise InvalidInput(f"damaged adapter: {module} has no ia3_l tensor")
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_ff = re.fullmatch(feedforward, module) is not None
    else:
        is_ff = any(module == name or module.endswith(f".{name}") for name in feedforward)
    deltas = [Delta(kind="ia3", fan_in_fan_out=fan_in_fan_out, vector=vector, feedforward=is_ff)]
    if not is_ff and f"{module}.bias" in base.meta:
        deltas.append(Delta(kind="ia3_bias", vector=vector))
    return deltas


def _check_shape(key: str, delta: Delta, shape: tuple, adapter_dir: Path) -> None:
    if delta.kind == "ia3_bias":
        ok = shape == (delta.vector.shape[0],)
        wanted = f"({delta.vector.shape[0]},)"
    elif len(shape) != 2:
        ok, wanted = False, "a matrix"
    else:
        out_in = shape[::-1] if delta.fan_in_fan_out else shape
        if delta.kind == "ia3":
            want = (1, out_in[1]) if delta.feedforward else (out_in[0], 1)
            ok = tuple(delta.vector.shape) == want
            wanted = f"ia3_l {list(delta.vector.shape)}, {'feed-forward' if delta.feedforward else 'not feed-forward'}"
        else:
            want = (delta.b.shape[0], delta.a.shape[1])
            ok = tuple(out_in) == want and (delta.magnitude is None or delta.magnitude.shape == (want[0],))
            wanted = f"(out, in) = {list(want)}"
    if not ok:
        raise InvalidInput(f"the base's {key} has shape {list(shape)}, which does not fit the adapter in "
                           f"{adapter_dir} ({wanted})", hint="check that --base is the model the adapter was "
                           "trained on")


def apply_deltas(tensor, deltas: list[Delta]):
    """The merged tensor, computed in float32."""
    import torch

    w = tensor.float()
    for d in deltas:
        if d.kind == "ia3_bias":
            w = w * d.vector.reshape(-1)
            continue
        w = w.T if d.fan_in_fan_out else w  # every formula below sees (out, in)
        if d.kind == "ia3":
            w = w * d.vector
        else:
            w = torch.addmm(w, d.b, d.a, alpha=d.scale)  # W + s * B @ A with one output allocation
            if d.kind == "dora":
                w = (d.magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1) * w
        w = w.T if d.fan_in_fan_out else w
    return w.contiguous()


# --- quantised bases: the weights the adapter was trained on -----------------------------------------------------


def _quant_note(quant: dict) -> str:
    if quant["bits"] == 4:
        return (f"merged onto the {quant['quant_type']}-dequantised weights the adapter was trained on "
                "(quantised here exactly as bitsandbytes did when loading the base)")
    return ("merged onto bitsandbytes' int8 weights, dequantised (row-wise absmax / 127); 8-bit layers also quantise "
            "their inputs at run time, which a merged model cannot reproduce, so it computes slightly differently "
            "from the 8-bit base + adapter")


def quantized_weights(config, quant: dict, *, trust_remote_code: bool = False) -> dict[str, bool]:
    """checkpoint key -> stored transposed (Conv1D), for every weight bitsandbytes quantises when it loads this
    model: transformers' own module replacement, run on an empty (meta) model."""
    from transformers.quantizers import AutoHfQuantizer

    from peftctl.model import quantization_config
    from peftctl.recipe.schema import QuantizationSection

    model = empty_model(config, trust_remote_code=trust_remote_code)
    section = QuantizationSection(**{k: v for k, v in quant.items() if k != "load_dtype"})
    quantizer = AutoHfQuantizer.from_config(quantization_config(section), pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            found[f"{name}.weight"] = getattr(getattr(module, "source_cls", None), "__name__", "") == "Conv1D"
    if not found:
        raise PeftctlError("found no layer that bitsandbytes quantises in this model",
                           hint="merge onto the original weights with --from-quantized original")
    return found


def weight_transform(quant: dict, quantized: dict[str, bool]):
    """(key, tensor) -> tensor: the weights bitsandbytes quantises come back as its dequantised values, bit for bit
    (cast to the dtype the base was loaded in, quantised, dequantised; Conv1D weights transposed around it)."""
    def transform(key: str, tensor):
        if key not in quantized:
            return tensor
        transposed = quantized[key]
        w = tensor.T if transposed else tensor
        w = dequantized_weight(w.to(quant["load_dtype"]).contiguous(), quant)
        return (w.T if transposed else w).contiguous()

    return transform


def dequantized_weight(w, quant: dict):
    """What a bitsandbytes layer holds for the (out, in) weight `w` (in the dtype the base was loaded in), as
    floating point: 4-bit via quantize_4bit / dequantize_4bit with Params4bit's own block size; 8-bit via
    Int8Params' float16 row-wise absmax quantisation."""
    import bitsandbytes as bnb
    import torch

    if quant["bits"] == 4:
        blocksize = bnb.nn.Params4bit(torch.empty(0), requires_grad=False).blocksize
        packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant["quant_type"],
                                                     compress_statistics=quant["double_quant"])
        return bnb.functional.dequantize_4bit(packed, state)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    return bnb.functional.int8_vectorwise_dequant(cb, scb)


# --- verification: base + adapter against the merged shards, one decoder layer at a time ------------------------


def verify_merge(base: Checkpoint, merged: Checkpoint, adapter_dir: Path, config, dtype_name: str, quant: dict | None,
                 transform, deltas: dict, *, trust_remote_code: bool = False) -> dict:
    """Logit differences, all computed in float32 on a few random token sequences, of the merged shards as written
    against base + adapter (peft's layers at run time) and against the base, both with the base in the output
    dtype; for a half-precision output, also of the merge arithmetic before rounding against base + adapter."""
    import torch

    vocab = getattr(config, "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (VERIFY_SEQUENCES, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0))
    notes: list[str] = []
    reference = adapter_model(config, adapter_dir, trust_remote_code=trust_remote_code)

    def empty():
        return empty_model(config, trust_remote_code=trust_remote_code)

    out_dtype = getattr(torch, dtype_name)

    def in_out_dtype(weights):
        # The base as it would run in the output dtype, so that what is compared is the merge, not a dtype change.
        def convert(key, tensor):
            tensor = weights(key, tensor) if weights else tensor
            return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
        return convert

    with_adapter = stream_logits(reference, base, ids, in_out_dtype(transform), notes)
    with reference.disable_adapter():
        base_logits = stream_logits(reference, base, ids, in_out_dtype(transform), notes)
    merged_logits = stream_logits(empty(), merged, ids, None, notes)
    scale = with_adapter.abs().max().item() or 1.0

    def relative(a, b) -> float:
        return (a - b).abs().max().item() / scale

    result = {"sequences": VERIFY_SEQUENCES, "tokens": VERIFY_TOKENS, "dtype": dtype_name, "logit_scale": scale,
              "reference": "base + adapter" + (" (dequantised base)" if transform else ""),
              "relative_diff": relative(merged_logits, with_adapter), "tolerance": TOLERANCE[dtype_name],
              "base_relative_diff": relative(merged_logits, base_logits),
              "adapter_relative_effect": relative(with_adapter, base_logits)}
    if dtype_name != "float32":
        # The merge before rounding: any error in the arithmetic shows here at float32 precision.
        def merged_in_float32(key, tensor):
            tensor = in_out_dtype(transform)(key, tensor)
            return apply_deltas(tensor, deltas[key]) if key in deltas else tensor
        exact = stream_logits(empty(), base, ids, merged_in_float32, notes)
        result["float32_relative_diff"] = relative(exact, with_adapter)
    if quant and transform is None:
        # What training saw: the quantised base + adapter. This merge drops that quantisation error on purpose.
        quantized = quantized_weights(config, quant, trust_remote_code=trust_remote_code)
        trained_weights = in_out_dtype(weight_transform(quant, quantized))
        trained = stream_logits(reference, base, ids, trained_weights, notes)
        with reference.disable_adapter():
            quantized_base = stream_logits(reference, base, ids, trained_weights, notes)
        result["trained_relative_diff"] = relative(merged_logits, trained)
        result["quantization_relative_diff"] = relative(quantized_base, base_logits)
        notes.append(f"merged onto the original weights: differs from the function that was trained ({quant['bits']}"
                     f"-bit base + adapter) by {result['trained_relative_diff']:.3g} relative, about one "
                     f"quantisation error (the base alone moves by {result['quantization_relative_diff']:.3g})")
    result["notes"] = notes
    return result


def check_verification(result: dict, out_dir: Path) -> None:
    """Exit 1 (VerificationFailed) unless the merged model computes base + adapter and differs from the base."""
    error, effect, tolerance = result["relative_diff"], result["base_relative_diff"], result["tolerance"]
    exact = result.get("float32_relative_diff", error)
    nothing = f"; nothing written to {out_dir}"
    if not (error <= tolerance and exact <= TOLERANCE["float32"]):  # NaN fails too
        raise VerificationFailed(
            f"verification failed: the merged model's logits differ from base + adapter by {error:.3g} relative "
            f"(tolerance {tolerance:g} for {result['dtype']})"
            + (f", {exact:.3g} before rounding (tolerance {TOLERANCE['float32']:g})" if "float32_relative_diff"
               in result else "") + nothing,
            hint="report it with the adapter's adapter_config.json; --no-verify writes it anyway")
    if not effect > MIN_EFFECT:
        raise VerificationFailed(
            f"verification failed: the merged model equals the base model (largest logit difference {effect:.3g} "
            "relative): the adapter changes nothing" + nothing,
            hint="was the adapter trained? a fresh LoRA adapter has B = 0 (check the run's loss curve)")
    if not effect >= 0.5 * result["adapter_relative_effect"]:
        raise VerificationFailed(
            f"verification failed: the merged model is almost the base model (largest logit difference {effect:.3g} "
            f"relative, where the adapter changes {result['adapter_relative_effect']:.3g}): rounding to "
            f"{result['dtype']} lost most of the adapter's change" + nothing,
            hint="merge in a wider dtype: --dtype float32")


def empty_model(config, *, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (no memory) and real buffers (rotary tables).

    trust_remote_code: the consent given on the command line (--trust-remote-code); without it transformers
    would ask on stdin (or refuse) for a model whose classes live in its folder."""
    import torch
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


@contextmanager
def _parameters_on_meta():
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def adapter_model(config, adapter_dir: Path, *, trust_remote_code: bool = False):
    """peft's adapter layers around an empty base: the adapter tensors are real, the base weights stay on meta
    until `stream_logits` brings them in layer by layer."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from torch import nn

    model = PeftModel.from_pretrained(empty_model(config, trust_remote_code=trust_remote_code), str(adapter_dir),
                                      low_cpu_mem_usage=True)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"), device="cpu")
    used = set()
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{module_name}.{name}"
            if param is None or ".default" not in full:
                continue
            key = full.replace(".default", "")  # peft saves without the adapter name ...
            if key.endswith("lora_magnitude_vector.weight"):
                key = key[: -len(".weight")]  # ... and DoRA magnitudes without .weight
            if key not in saved:
                raise InvalidInput(f"{adapter_dir}: the adapter has no tensor {key}")
            module._parameters[name] = nn.Parameter(saved[key].float(), requires_grad=False)
            used.add(key)
    if set(saved) - used:
        raise InvalidInput(f"{adapter_dir}: the adapter has tensors its config does not explain, e.g. "
                           f"{sorted(set(saved) - used)[0]}")
    model.eval()
    return model


def stream_logits(model, source: Checkpoint, ids, transform, notes: list[str]):
    """Logits of `model` on `ids`, its meta parameters read from `source` (through `transform`): the parts outside
    the decoder layers for the whole pass, each decoder layer only while it runs."""
    import torch
    from torch import nn

    from peftctl.methods.bottleneck import decoder_layers

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        layers = list(decoder_layers(inner))
    except ValueError:
        layers = []
        if not any("whole model" in n for n in notes):
            notes.append("this architecture's decoder layers were not found: verification loaded the whole model")
    tied = _tied_keys(inner)
    slots: dict[int, list] = {}  # layer index (-1: outside the layers) -> [(module, name, checkpoint key)]
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for module_name, module in inner.named_modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                key = f"{module_name}.{name}".replace(".base_layer.", ".")
                key = key if key in source.meta else tied.get(key, key)
                if key not in source.meta:
                    raise PeftctlError(f"cannot verify: the checkpoint has no tensor {key} (its names differ from "
                                       "the model's)", hint="merge with --no-verify and check the result yourself")
                slots.setdefault(owner.get(id(module), -1), []).append((module, name, key))

    def load(entries):
        tensors = source.read([key for *_, key in entries])
        for module, name, key in entries:
            tensor = transform(key, tensors[key]) if transform else tensors[key]
            module._parameters[name] = nn.Parameter(tensor.float(), requires_grad=False)

    def unload(entries):
        for module, name, _ in entries:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)
        _give_back_freed_memory()

    hooks = []
    for i, layer in enumerate(layers):
        entries = slots.get(i, [])
        hooks.append(layer.register_forward_pre_hook(lambda *_, e=entries: load(e)))
        hooks.append(layer.register_forward_hook(lambda *_, e=entries: unload(e)))
    load(slots.get(-1, []))
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
        for entries in slots.values():
            unload(entries)


def _give_back_freed_memory() -> None:
    """glibc keeps memory freed by one layer's activations in its per-thread arenas, where it counts as resident
    until reused (measured: +190 MB over four layers of a 1.2 GB model); trimming after each layer keeps the peak
    at about one layer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _tied_keys(model) -> dict[str, str]:
    """output-embedding key -> input-embedding key, when the checkpoint stores them once."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None:
        return {}
    return {f"{names[id(out)]}.weight": f"{names[id(emb)]}.weight"}


# --- the output folder: built beside --out, renamed into place ---------------------------------------------------


def staging_dir(final: Path):
    """The output folder is built beside --out under `.OUT.merging-PID-*` and renamed into place at the end."""
    from peftctl.train.run_folder import staged_dir

    return staged_dir(final, label="merging")
    return True


@contextmanager
def _stop_on_sigterm():
    """SIGTERM raises, so the staging folder is removed on the way out (SIGINT already raises KeyboardInterrupt)."""
    def handle(signum, frame):
        raise MergeStopped("stopped by SIGTERM; nothing written", EXIT_SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
