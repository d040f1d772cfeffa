"""Where the merge computes, and the pipeline that keeps host memory low while it does.

On a GPU each base tensor is read from its file in chunks into a pinned buffer and copied to the GPU (the next
chunk is read while the copy runs), merged there (bitsandbytes' GPU kernels for NF4), and copied back in chunks
into pinned buffers that a writer thread appends to the output shard while the GPU works on the next tensor. Host
memory is the pinned buffers (2 x 2 chunks), not the tensor: a 16 GB single-file base is never mapped whole.
On the CPU the tensors come from safetensors' mapping one at a time and the writer thread overlaps the disk
writes with the next tensor's arithmetic (which torch already spreads over the cores).
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from contextlib import contextmanager
from pathlib import Path

from peftctl.errors import InvalidInput

CHUNK = 1 << 27  # bytes per pinned buffer (128 MiB): 4 of them are the host memory the GPU path adds
WRITE_QUEUE = 2  # tensors (CPU) or chunks (GPU) waiting for the disk at most


def resolve_device(name: str):
    """auto: the GPU when torch sees one; cuda without one is refused (exit 2)."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidInput("--device cuda: torch sees no GPU on this machine", hint="use --device cpu (or auto)")
    return torch.device("cuda", torch.cuda.current_device())


@contextmanager
def full_float32():
    """float32 matrix products in full precision while merging and verifying: TF32 (which a training process may
    have switched on) rounds inputs to 10 bits of mantissa, far above the float32 noise that verification allows."""
    import torch

    precision, allow = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = allow


class BackgroundWriter:
    """File writes in order on one thread; a failure there is raised on the caller's next call."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="peftctl-merge-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self.error = e

    def submit(self, job) -> None:
        self._raise()
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def abandon(self) -> None:
        """On the way out after an error: stop the thread without running what is queued."""
        self.error = self.error or RuntimeError("abandoned")
        try:
            while True:
                self.jobs.get_nowait()
        except queue.Empty:
            pass
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def check(self) -> None:
        self._raise()

    def _raise(self):
        if self.error is not None:
            error, self.error = self.error, RuntimeError("the writer stopped after an error")
            raise error


def header_offsets(path: Path) -> tuple[int, dict]:
    """(where the data starts, key -> (start, end) byte offsets) from a safetensors file's own header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, {key: tuple(entry["data_offsets"]) for key, entry in header.items()}


class GpuPipeline:
    """Reads base tensors straight into GPU memory and writes GPU tensors to shards through pinned buffers."""

    def __init__(self, device):
        import torch

        self.device, self.torch = device, torch
        self.cuda = device.type == "cuda"  # on the CPU the same pipeline runs without pinning or events (tests)
        self.stream = torch.cuda.current_stream(device) if self.cuda else None
        self.inputs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.input_done = [None, None]
        self.outputs = None  # allocated by the first write: verification only reads
        self.output_free = [threading.Event(), threading.Event()]
        for event in self.output_free:
            event.set()
        self.turn = 0
        self.offsets: dict[Path, tuple[int, dict]] = {}

    def read(self, path: Path, key: str, dtype, shape):
        """The tensor `key` of `path` on the GPU, read in chunks through the pinned input buffers."""
        torch = self.torch
        if path not in self.offsets:
            self.offsets[path] = header_offsets(path)
        start, entries = self.offsets[path]
        begin, end = entries[key]
        data = torch.empty(end - begin, dtype=torch.uint8, device=self.device)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            done, slot = 0, 0
            while done < end - begin:
                n = min(CHUNK, end - begin - done)
                if self.input_done[slot] is not None:
                    self.input_done[slot].synchronize()  # the copy out of this buffer has finished
                buffer = self.inputs[slot][:n]
                view = memoryview(buffer.numpy())
                got = 0
                while got < n:
                    read = f.readinto(view[got:])
                    if not read:
                        raise InvalidInput(f"{path}: truncated safetensors file (tensor {key})")
                    got += read
                data[done:done + n].copy_(buffer, non_blocking=True)
                self.input_done[slot] = self._event()
                done, slot = done + n, 1 - slot
        if data.numel() == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return data.view(dtype).reshape(shape)

    def write(self, writer: BackgroundWriter, shard, key: str, tensor) -> None:
        """Queue the GPU tensor `tensor` for `shard`: copied back chunk by chunk, written by the writer thread."""
        torch = self.torch
        flat = tensor.detach().contiguous().reshape(-1)
        data = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=self.device)
        shape, dtype = tuple(tensor.shape), tensor.dtype
        if self.outputs is None:
            self.outputs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        writer.submit(lambda: shard.begin(key, shape, dtype))
        for done in range(0, data.numel(), CHUNK):
            n = min(CHUNK, data.numel() - done)
            slot = self.turn
            self.turn = 1 - self.turn
            while not self.output_free[slot].wait(1.0):  # the writer has written what this buffer held ...
                writer.check()  # ... or has stopped on an error, which is raised here
            self.output_free[slot].clear()
            buffer = self.outputs[slot][:n]
            buffer.copy_(data[done:done + n], non_blocking=True)
            copied = self._event()

            def job(buffer=buffer, copied=copied, free=self.output_free[slot]):
                if copied is not None:
                    copied.synchronize()
                shard.append(memoryview(buffer.numpy()))
                free.set()
            writer.submit(job)
        writer.submit(lambda: shard.end())

    def _event(self):
        """A CUDA event recorded after the copies issued so far (None on the CPU, where copies are synchronous)."""
        if not self.cuda:
            return None
        event = self.torch.cuda.Event()
        event.record(self.stream)
        return event


class DeviceCache:
    """A checkpoint whose tensors stay on the GPU once read: the merge fills it as it streams the base, and the
    verification's passes over the base (with and without the adapter, the merge before and after rounding) then
    read nothing from disk. Used only when the base takes a small part of the GPU's memory."""

    def __init__(self, checkpoint, device):
        self.checkpoint, self.device, self.meta, self.tensors = checkpoint, device, checkpoint.meta, {}

    @staticmethod
    def fits(checkpoint, device) -> bool:
        import torch

        if device.type != "cuda":
            return False
        total = sum(p.stat().st_size for p in checkpoint.files)
        free, _ = torch.cuda.mem_get_info(device)
        return total < 0.3 * free

    def keep(self, key: str, tensor) -> None:
        self.tensors[key] = tensor

    def read(self, keys) -> dict:
        missing = [k for k in keys if k not in self.tensors]
        for key, tensor in (self.checkpoint.read(missing) if missing else {}).items():
            self.tensors[key] = tensor.to(self.device)
        return {k: self.tensors[k] for k in keys}


class PipelinedCheckpoint:
    """A checkpoint read through a GpuPipeline: tensors arrive on the GPU through the pinned buffers, without
    mapping the file (a 16 GB single-file checkpoint read through its mapping is slower and counts as resident)."""

    def __init__(self, checkpoint, pipeline: GpuPipeline):
        self.checkpoint, self.pipeline, self.meta = checkpoint, pipeline, checkpoint.meta

    def read(self, keys) -> dict:
        from peftctl.merge.safetensors_io import storage_dtype

        out = {}
        for key in keys:
            code, shape = self.meta[key]
            out[key] = self.pipeline.read(self.checkpoint.file_of[key], key, storage_dtype(code), shape)
        return out
