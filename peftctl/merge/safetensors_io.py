"""safetensors checkpoints: reading headers and tensors, planning output shards and writing them tensor by tensor
(safetensors' own save_file needs every tensor in memory at once; a 16 GB single-file base does not fit that)."""

from __future__ import annotations

import json
import math
import os
import struct
from functools import cache
from pathlib import Path

from peftctl.errors import InvalidInput
from peftctl.merge.common import OUTPUT_DTYPES


class SafetensorsFolder:
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


@cache
def _dtype_codes():
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def storage_dtype(code: str):
    """safetensors dtype code -> torch dtype."""
    return {c: dt for dt, c in _dtype_codes().items()}[code]


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

        self.begin(key, tuple(tensor.shape), tensor.dtype)
        if tensor.numel():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self.append(memoryview(flat.numpy()))
        self.end()

    def begin(self, key: str, shape: tuple, dtype) -> None:
        """The next tensor's bytes follow (`append`, then `end`): it must be the one the header planned."""
        name, code, planned, _ = self.entries[self.next]
        if key != name or tuple(shape) != planned or _dtype_codes()[dtype] != code:
            raise RuntimeError(f"{self.path.name}: expected {name} {code}{list(planned)}, got {key} "
                               f"{dtype}{list(shape)}")
        self.written = 0

    def append(self, data) -> None:
        self.file.write(data)
        self.written += len(data) if not isinstance(data, memoryview) else data.nbytes

    def end(self) -> None:
        name, _, _, nbytes = self.entries[self.next]
        if self.written != nbytes:
            raise RuntimeError(f"{self.path.name}: {name} has {self.written} bytes, planned {nbytes}")
        self.next += 1

    def close(self, sync: bool = True) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"{self.path.name}: {len(self.entries) - self.next} tensor(s) never written")
        self.file.flush()
        if sync:
            os.fsync(self.file.fileno())
        self.file.close()


def sync_files(paths) -> None:
    """Everything written to `paths` on disk (fsync through a fresh descriptor flushes the file's dirty pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def plan_output_shards(base: SafetensorsFolder, out_dtype, limit: int) -> list[list[tuple[str, str, tuple, int]]]:
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
