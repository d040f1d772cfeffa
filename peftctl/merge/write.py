"""The output folder: merged shards streamed into a staging folder beside --out, the model's other files, and the
rename into place (a failed or stopped merge leaves nothing at --out)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from peftctl.errors import EXIT_SIGTERM, PeftctlError, sigterm_raises
from peftctl.merge.common import TOKENIZER_FILES
from peftctl.merge.deltas import apply_deltas, deltas_to
from peftctl.merge.device import BackgroundWriter, GpuPipeline
from peftctl.merge.safetensors_io import SafetensorsFolder, ShardWriter, plan_output_shards, storage_dtype, sync_files


class MergeStopped(PeftctlError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def write_merged_shards(base: SafetensorsFolder, out: Path, deltas: dict, transform, out_dtype, limit: int, say,
                        device="cpu", pipeline: bool | None = None, cache=None, syncs: list | None = None):
    """Stream every base tensor through `transform` (dequantisation) and its deltas into the output shards, on
    `device`, with the disk writes on a thread of their own (device.py has the pipeline). pipeline: read and write
    through the chunked buffers (default: on a GPU; the tests run it on the CPU too). cache: a DeviceCache that
    keeps each base tensor as read, for the verification. syncs: when a list, the shards are flushed to disk by a
    thread appended to it (it runs while the merge verifies; join it before renaming into place)."""
    import torch

    plan = plan_output_shards(base, out_dtype, limit)
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {key: i for i, entries in enumerate(plan) for key, *_ in entries}
    device = torch.device(device)
    gpu = GpuPipeline(device) if (device.type != "cpu" if pipeline is None else pipeline) else None
    if device.type != "cpu":
        deltas = deltas_to(deltas, device)
    writer = BackgroundWriter()
    shards: list[ShardWriter] = []
    merged = 0
    try:
        for number, path in enumerate(base.files, 1):
            say(f"  shard {number}/{len(base.files)}: {path.name}")
            for key in base.keys_of[path]:
                index = shard_of[key]
                if index >= len(shards):  # shards follow the base's order: the previous one is complete
                    if shards:
                        writer.submit(lambda shard=shards[-1]: shard.close(sync=False))
                    shards.append(ShardWriter(out / names[index], plan[index]))
                if gpu is not None:
                    tensor = gpu.read(path, key, storage_dtype(base.meta[key][0]), base.shape(key))
                else:
                    tensor = base.read([key])[key].to(device)  # (a no-op on the CPU)
                if cache is not None:
                    cache.keep(key, tensor)
                if transform is not None:
                    tensor = transform(key, tensor)
                if key in deltas:
                    tensor = apply_deltas(tensor, deltas[key])
                    merged += 1
                if tensor.is_floating_point():
                    tensor = tensor.to(out_dtype)
                if gpu is not None:
                    gpu.write(writer, shards[-1], key, tensor)
                else:
                    on_host = tensor.cpu()  # bound now: the writer thread runs the write later
                    writer.submit(lambda shard=shards[-1], key=key, tensor=on_host: shard.write(key, tensor))
                del tensor  # dropped as soon as it is written
        if shards:
            writer.submit(lambda shard=shards[-1]: shard.close(sync=False))
        writer.finish()
    except BaseException:
        writer.abandon()
        raise
    finally:
        for shard in shards:
            if not shard.file.closed:
                shard.file.close()
    syncer = threading.Thread(target=sync_files, args=([shard.path for shard in shards],), name="peftctl-merge-sync")
    syncer.start()
    if syncs is None:
        syncer.join()
    else:
        syncs.append(syncer)
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


def staging_dir(final: Path):
    """The output folder is built beside --out under `.OUT.merging-PID-*` and renamed into place at the end."""
    from peftctl.files import staged_dir

    return staged_dir(final, label="merging")


def _stop_on_sigterm():
    """SIGTERM raises, so the staging folder is removed on the way out."""
    return sigterm_raises(lambda: MergeStopped("stopped by SIGTERM; nothing written", EXIT_SIGTERM))
