"""`peftctl merge`: fold an adapter into its base model, one tensor at a time, and prove the result.

Read `merge_adapter` from top to bottom; the package's modules, in the order it uses them:
  inputs.py          arguments, the adapter and base folders (all checked before any weight is read)
  safetensors_io.py  checkpoint headers, tensors, output shards planned up front and written tensor by tensor
  layout.py          which checkpoint tensors hold each model parameter, from transformers' own mapping (tied heads,
                     renamed modules, experts stored one tensor per expert but held as fused 3-D parameters)
  deltas.py          the adapter as deltas on checkpoint tensors, and the float32 arithmetic that folds them in
  quantized.py       the weights an adapter trained on a bitsandbytes base saw
  device.py          --device, and the GPU pipeline (pinned buffers, a writer thread)
  write.py           the output folder, built beside --out and renamed into place
  verify.py          base + adapter against the merged shards, one decoder layer at a time
  models.py          empty (meta) models and peft's wrappers around them, for names and structure

The base is never loaded whole: on the CPU safetensors hands out views of the mapped file, released when the tensor
is dropped; on the GPU tensors are read through pinned buffers straight into GPU memory. Every tensor an adapter
touches gets its delta in float32 and is streamed into an output shard whose header was planned from the base's own
headers. Peak host memory is a few tensors (or the pinned buffers) plus the adapter while merging, and about one
decoder layer while verifying, whatever the model's size.

What a merge does to one weight W (shape (out, in); GPT-2's Conv1D stores (in, out) and is transposed around it):
  LoRA, rsLoRA   W + s * B @ A             s = alpha / r (rsLoRA: alpha / sqrt(r)); r = A.shape[0]
  DoRA           m / ||V||_row * V         V = W + s * B @ A, m the learned magnitude per output row
  IA3            W * l                     l scales input columns (feed-forward targets) or output rows (+ bias)
  experts        W_e + s * B_e @ A_e       peft's target_parameters: A (experts x r, in), B (out, r x experts)
For an adapter trained on a quantised base, W is first quantised and dequantised exactly as bitsandbytes did when
the base was loaded for training (default, `dequantized`): only that reproduces the function that was trained.
`original` merges onto the unquantised weights and is off by one quantisation error. Nothing is merged into 4-bit
weights. 8-bit bases: W becomes bitsandbytes' int8 weight dequantised (row-wise absmax / 127); bitsandbytes also
quantises activations at run time in 8-bit layers, which no merged model can reproduce (the note says so).

A merge fails with exit code 1, leaving nothing at --out, when its logits differ from base + adapter by more than
what rounding to the output dtype explains (verify.py says how that is measured), when it equals the base model
(an adapter that does nothing), or when rounding to the output dtype lost most of what the adapter changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftctl.adapter_folder import read_info
from peftctl.errors import InvalidInput
from peftctl.generation_config import write_into_merged as write_generation_config
from peftctl.merge.common import DEVICES, FROM_QUANTIZED, MERGE_INFO, OUTPUT_DTYPES, TOKENIZER_FILES  # noqa: F401
from peftctl.merge.deltas import Delta, apply_deltas, collect_deltas  # noqa: F401
from peftctl.merge.device import DeviceCache, full_float32, resolve_device
from peftctl.merge.inputs import adapter_folder, check_out_dir, mergeable, parse_shard_size, resolve_base  # noqa: F401
from peftctl.merge.layout import checkpoint_layout
from peftctl.merge.models import empty_model, parameter_targets  # noqa: F401
from peftctl.merge.quantized import (  # noqa: F401
    _quant_note,
    by_checkpoint_key,
    dequantized_weight,
    quantized_weights,
    weight_transform,
)
from peftctl.merge.safetensors_io import SafetensorsFolder, ShardWriter  # noqa: F401
from peftctl.merge.verify import VerificationFailed, adapter_model, check_verification, stream_logits, verify_merge  # noqa: F401
from peftctl.merge.write import MergeStopped, _stop_on_sigterm, staging_dir, write_merged_shards, write_model_files  # noqa: F401


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
    device: str = "cpu"
    tensors_merged: int = 0
    shards: int = 0
    verification: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        import peftctl

        return {"peftctl_version": peftctl.__version__, **asdict(self)}


def merge_adapter(adapter_dir, out_dir, *, base: str | None = None, dtype: str | None = None, verify: bool = True,
                  max_shard_size: int | str = "5GB", from_quantized: str = "dequantized", force: bool = False,
                  report: Callable[[str], None] | None = None, device: str = "auto",
                  trust_remote_code: bool = False) -> MergeReport:
    """Merge the adapter in `adapter_dir` (an adapter folder or a run folder) into its base; write `out_dir`."""
    say = report or (lambda message: None)
    t_start = time.time()

    # Everything that can be wrong with the arguments is checked before any weight is read.
    adapter_dir = adapter_folder(Path(adapter_dir))
    method, config = mergeable(adapter_dir)
    info = read_info(adapter_dir)
    if from_quantized not in FROM_QUANTIZED:
        raise InvalidInput(f"--from-quantized {from_quantized}: expected dequantized or original")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InvalidInput(f"--dtype {dtype}: expected {', '.join(OUTPUT_DTYPES)}")
    shard_limit = parse_shard_size(max_shard_size)
    if device not in DEVICES:
        raise InvalidInput(f"--device {device}: expected {', '.join(DEVICES)}")
    base_name = base or info.get("base_model") or config.get("base_model_name_or_path")
    if not base_name:
        raise InvalidInput(f"{adapter_dir}: the adapter does not say which base model it was trained on",
                           hint="pass --base MODEL")
    revision = info.get("revision") if base is None else None
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise InvalidInput(f"--out {out_dir} already exists", hint="choose another folder, or replace it with --force")
    base_folder = resolve_base(base_name, revision)
    check_out_dir(out_dir, adapter_dir, base_folder)
    quant = info.get("quantization")
    merge_report = MergeReport(out_dir=str(out_dir), adapter_dir=str(adapter_dir), method=info.get("method", method),
                               base=base_name, base_revision=revision, base_folder=str(base_folder), dtype="",
                               quantization=quant, from_quantized=from_quantized if quant else None)

    import torch
    from transformers import AutoConfig

    base_ckpt = SafetensorsFolder(base_folder)
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

    target = resolve_device(device)
    merge_report.device = str(target)
    say(f"reading the {method} adapter in {adapter_dir}")
    # Tensor names come from the model's own mapping: tied heads, renamed modules, experts stored one by one.
    layout = checkpoint_layout(empty_model(model_config, trust_remote_code=trust), base_ckpt.meta, strict=False)
    targets = None
    if config.get("target_parameters"):
        targets = parameter_targets(empty_model(model_config, trust_remote_code=trust), adapter_dir)
    deltas = collect_deltas(adapter_dir, method, config, base_ckpt, layout, targets)
    transform = None
    if quant:
        # The dtype the base was loaded in for training is what bitsandbytes quantised.
        load_dtype = getattr(torch, info.get("dtype") if info.get("dtype") in OUTPUT_DTYPES
                             else base_ckpt.dtype_name(base_config))
        quant = {**quant, "load_dtype": load_dtype}
        if from_quantized == "dequantized":
            quantized = by_checkpoint_key(quantized_weights(model_config, quant, trust_remote_code=trust), layout)
            transform = weight_transform(quant, quantized)
            merge_report.notes.append(_quant_note(quant))
        else:
            merge_report.notes.append(f"merged onto the original weights, not the {quant['bits']}-bit ones the "
                                      "adapter was trained on: off by about one quantisation error")

    with _stop_on_sigterm(), full_float32(), staging_dir(out_dir) as tmp:
        cache = DeviceCache(base_ckpt, target) if verify and DeviceCache.fits(base_ckpt, target) else None
        syncs: list = []  # the shards go to disk while the merge verifies
        try:
            say(f"merging onto {base_name} ({len(base_ckpt.files)} shard(s)) in {out_dtype_name}")
            merge_report.shards, merge_report.tensors_merged = write_merged_shards(
                base_ckpt, tmp, deltas, transform, out_dtype, shard_limit, say, device=target, cache=cache, syncs=syncs)
            write_model_files(tmp, base_folder, adapter_dir, base_config, out_dtype_name)
            write_generation_config(tmp, adapter_dir)  # the adapter's stop tokens and pad id over the base's
            if verify:
                say("verifying: base + adapter against the merged shards, one layer at a time")
                merge_report.verification = verify_merge(cache or base_ckpt, SafetensorsFolder(tmp), adapter_dir,
                                                         model_config, out_dtype_name, quant, transform, deltas,
                                                         trust_remote_code=trust, device=target)
                merge_report.notes += merge_report.verification.pop("notes", [])
                check_verification(merge_report.verification, out_dir)
            merge_report.seconds = round(time.time() - t_start, 2)
            (tmp / MERGE_INFO).write_text(json.dumps(merge_report.as_dict(), indent=2) + "\n")
        finally:
            for syncer in syncs:  # on disk before the folder is renamed into place (or removed)
                syncer.join()
    return merge_report
