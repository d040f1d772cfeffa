"""Verification: base + adapter against the merged shards, one decoder layer at a time.

Token sequences run through the model one decoder layer at a time, each layer's weights read from the checkpoint
just before it runs and dropped after, all in float32, on the merge's device:
  with_adapter  peft's own adapter layers over the base weights (in the output dtype): the reference, computed
                independently of the merge arithmetic
  base          the same with the adapter disabled
  merged        the merged shards as written
and, for a half-precision output, the merge arithmetic itself:
  exact         the base plus the deltas in float32, not rounded: checks the arithmetic against peft (fp32 noise)
  rounded       the merge's own arithmetic (base in its stored dtype + deltas, rounded once to the output dtype),
                on the same device: the written shards must equal it (on the CPU compared tensor by tensor
                during the exact pass, and the pass runs only if some tensor differs: WrittenCheck)
Then merged - with_adapter <= (rounded - exact) + merged - rounded + exact - with_adapter: the tolerance for the
headline figure is what rounding the merged weights to the output dtype does to the logits (which grows with the
adapter's effect) plus float32 noise twice -- never a fixed number that a strong adapter exceeds.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftctl.errors import InvalidInput, PeftctlError
from peftctl.merge.deltas import apply_deltas
from peftctl.merge.device import DeviceCache, GpuPipeline, PipelinedCheckpoint
from peftctl.merge.layout import assemble, checkpoint_layout
from peftctl.merge.models import empty_model
from peftctl.merge.quantized import by_checkpoint_key, quantized_weights, weight_transform
from peftctl.merge.safetensors_io import SafetensorsFolder
from peftctl.model import base_model

FLOAT32_TOLERANCE = 1e-4  # relative logit difference of float32 rounding noise (measured ~1e-7 on tiny models)
MIN_EFFECT = 1e-6  # relative: below this the merged model is the base model, whatever the dtype
VERIFY_SEQUENCES, VERIFY_TOKENS = 4, 32


class VerificationFailed(PeftctlError):
    """The merged model does not compute what base + adapter computes (exit 1; nothing is written)."""


def verify_merge(base: SafetensorsFolder, merged: SafetensorsFolder, adapter_dir: Path, config, dtype_name: str,
                 quant: dict | None, transform, deltas: dict, *, trust_remote_code: bool = False,
                 device="cpu") -> dict:
    """Logit differences (relative to the largest reference logit) of the merged shards as written against base +
    adapter and against the base; for a half-precision output also of the merge before and after rounding."""
    import torch

    vocab = getattr(config, "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (VERIFY_SEQUENCES, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0))
    notes: list[str] = []
    reference = adapter_model(config, adapter_dir, trust_remote_code=trust_remote_code)
    out_dtype = getattr(torch, dtype_name)

    def empty():
        return empty_model(config, trust_remote_code=trust_remote_code)

    def in_out_dtype(weights):
        # The base as it would run in the output dtype, so that what is compared is the merge, not a dtype change.
        def convert(key, tensor):
            tensor = weights(key, tensor) if weights else tensor
            return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
        return convert

    if torch.device(device).type == "cuda":  # read straight into GPU memory (a DeviceCache is there already)
        pipeline = GpuPipeline(torch.device(device))
        merged = PipelinedCheckpoint(merged, pipeline)
        base = base if isinstance(base, DeviceCache) else PipelinedCheckpoint(base, pipeline)

    def run(model, source, weights):
        return stream_logits(model, source, ids, weights, notes, device=device)

    with_adapter = run(reference, base, in_out_dtype(transform))
    with reference.disable_adapter():
        base_logits = run(reference, base, in_out_dtype(transform))
    merged_logits = run(empty(), merged, None)
    scale = with_adapter.abs().max().item() or 1.0

    def relative(a, b) -> float:
        return (a - b).abs().max().item() / scale

    result = {"sequences": VERIFY_SEQUENCES, "tokens": VERIFY_TOKENS, "dtype": dtype_name, "logit_scale": scale,
              "device": str(device), "reference": "base + adapter" + (" (dequantised base)" if transform else ""),
              "relative_diff": relative(merged_logits, with_adapter), "tolerance": 2 * FLOAT32_TOLERANCE,
              "base_relative_diff": relative(merged_logits, base_logits),
              "adapter_relative_effect": relative(with_adapter, base_logits)}
    if dtype_name != "float32":
        deltas = _deltas_on(deltas, device)

        def merged_weights(rounded: bool):
            def weights(key, tensor):
                if not rounded:  # base + adapter as the reference runs it, but folded in float32
                    tensor = in_out_dtype(transform)(key, tensor)
                    return apply_deltas(tensor.to(device), deltas[key]) if key in deltas else tensor
                # exactly the merge's arithmetic (base in its own dtype, dequantised, folded, rounded once)
                tensor = transform(key, tensor.to(device)) if transform else tensor
                tensor = apply_deltas(tensor.to(device), deltas[key]) if key in deltas else tensor
                return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
            return weights

        check = WrittenCheck(merged, out_dtype, transform, deltas) if torch.device(device).type == "cpu" else None
        exact_weights = merged_weights(rounded=False)
        exact = run(empty(), base, check.exact_and_compare(exact_weights) if check else exact_weights)
        if check is not None and check.seen and not check.differing:
            rounded = merged_logits  # the same weights, bit for bit, through the same model: the same logits
        else:
            rounded = run(empty(), base, merged_weights(rounded=True))
        result["float32_relative_diff"] = relative(exact, with_adapter)
        result["rounding_relative_diff"] = relative(rounded, exact)
        result["written_relative_diff"] = relative(merged_logits, rounded)
        result["tolerance"] = result["rounding_relative_diff"] + 2 * FLOAT32_TOLERANCE
    if quant and transform is None:
        # What training saw: the quantised base + adapter. This merge drops that quantisation error on purpose.
        quantized = by_checkpoint_key(quantized_weights(config, quant, trust_remote_code=trust_remote_code),
                                      checkpoint_layout(empty(), base.meta, strict=False))
        trained_weights = in_out_dtype(weight_transform(quant, quantized))
        trained = run(reference, base, trained_weights)
        with reference.disable_adapter():
            quantized_base = run(reference, base, trained_weights)
        result["trained_relative_diff"] = relative(merged_logits, trained)
        result["quantization_relative_diff"] = relative(quantized_base, base_logits)
        notes.append(f"merged onto the original weights: differs from the function that was trained ({quant['bits']}"
                     f"-bit base + adapter) by {result['trained_relative_diff']:.3g} relative, about one "
                     f"quantisation error (the base alone moves by {result['quantization_relative_diff']:.3g})")
    result["notes"] = notes
    return result


class WrittenCheck:
    """On the CPU, the written shards against the merge's own arithmetic, tensor by tensor, during the exact pass.

    The rounded pass runs the merge's arithmetic (base in its stored dtype + deltas, rounded once) through a model; the
    merged pass runs the written shards through the same model. When every tensor the model reads is equal bit for
    bit, the two passes compute the same logits, so the rounded pass is skipped (it was a fifth forward over the whole
    model: ~20% of a CPU merge). The exact pass already holds base + deltas in float32: when its input is the base in
    its own dtype, rounding that is the merge's arithmetic at no extra cost. Any difference runs the rounded pass."""

    def __init__(self, merged: SafetensorsFolder, out_dtype, transform, deltas: dict):
        self.merged, self.out_dtype, self.transform, self.deltas = merged, out_dtype, transform, deltas
        self.seen, self.differing = 0, []

    def exact_and_compare(self, exact_weights):
        def weights(key, tensor):
            exact = exact_weights(key, tensor)
            self.compare(key, tensor, exact)
            return exact
        return weights

    def compare(self, key: str, tensor, exact) -> None:
        if key in self.deltas and self.transform:
            tensor = self.transform(key, tensor)
        if key not in self.deltas or tensor.dtype == self.out_dtype or not tensor.is_floating_point():
            rounded = exact  # the same input to the same arithmetic (nothing rounded before the deltas)
        else:  # e.g. a float32 base merged into bfloat16: the merge rounds once, after the deltas
            rounded = apply_deltas(tensor, self.deltas[key])
        rounded = rounded.to(self.out_dtype) if rounded.is_floating_point() else rounded
        written = self.merged.read([key])[key]
        self.seen += 1
        if written.dtype != rounded.dtype or not _same_tensor(written, rounded):
            self.differing.append(key)


def _same_tensor(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def _deltas_on(deltas: dict, device) -> dict:
    from peftctl.merge.deltas import deltas_to

    return deltas if str(device) == "cpu" else deltas_to(deltas, device)


def check_verification(result: dict, out_dir: Path) -> None:
    """Exit 1 (VerificationFailed) unless the merged model computes base + adapter and differs from the base."""
    error, effect, tolerance = result["relative_diff"], result["base_relative_diff"], result["tolerance"]
    exact = result.get("float32_relative_diff", error)
    written = result.get("written_relative_diff", error)
    nothing = f"; nothing written to {out_dir}"
    if not (error <= tolerance and exact <= FLOAT32_TOLERANCE and written <= FLOAT32_TOLERANCE):  # NaN fails too
        detail = ""
        if "float32_relative_diff" in result:
            detail = (f"; before rounding {exact:.3g} (tolerance {FLOAT32_TOLERANCE:g}), as written against the "
                      f"same merge rounded in memory {written:.3g} (tolerance {FLOAT32_TOLERANCE:g}), rounding to "
                      f"{result['dtype']} alone {result['rounding_relative_diff']:.3g}")
        raise VerificationFailed(
            f"verification failed: the merged model's logits differ from base + adapter by {error:.3g} relative "
            f"(tolerance {tolerance:.3g} for {result['dtype']}){detail}" + nothing,
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


def stream_logits(model, source: SafetensorsFolder, ids, transform, notes: list[str], *, device="cpu"):
    """Logits of `model` on `ids`, its meta parameters read from `source` (through `transform`, per checkpoint
    tensor) by the model's own names: the parts outside the decoder layers for the whole pass, each decoder layer
    only while it runs."""
    import torch
    from torch import nn

    from peftctl.model import decoder_layers

    inner = base_model(model)
    try:
        layers = list(decoder_layers(inner))
    except ValueError:
        layers = []
        if not any("whole model" in n for n in notes):
            notes.append("this architecture's decoder layers were not found: verification loaded the whole model")
    slots: dict[int, list] = {}  # layer index (-1: outside the layers) -> [(module, name, parameter name)]
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    shapes = {}
    for module_name, module in inner.named_modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                full = re.sub(r"\.base_layer(?=\.)", "", f"{module_name}.{name}")
                shapes[full] = tuple(param.shape)
                slots.setdefault(owner.get(id(module), -1), []).append((module, name, full))
    try:
        layout = checkpoint_layout(inner, source.meta, shapes)
    except PeftctlError as e:
        raise PeftctlError(f"cannot verify: {e.message}", hint="merge with --no-verify and check the result "
                           "yourself") from None
    _move_real_tensors(inner, device)

    def load(entries):
        keys = [piece.key for *_, full in entries for piece in layout[full]]
        tensors = source.read(list(dict.fromkeys(keys)))
        # onto the device in the stored dtype, converted there: the host never holds a float32 copy
        tensors = {k: (transform(k, t.to(device)) if transform else t.to(device)) for k, t in tensors.items()}
        for module, name, full in entries:
            shape = tuple(module._parameters[name].shape)
            tensor = assemble(shape, layout[full], tensors)
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
            return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
        for entries in slots.values():
            unload(entries)


def _move_real_tensors(model, device) -> None:
    """Buffers (rotary tables) and the adapter's own tensors onto `device`; meta parameters stay meta."""
    from torch import nn

    if str(device) == "cpu":
        return
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
        for name, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to(device), requires_grad=False)


def _give_back_freed_memory() -> None:
    """glibc keeps memory freed by one layer's activations in its per-thread arenas, where it counts as resident
    until reused (measured: +190 MB over four layers of a 1.2 GB model); trimming after each layer keeps the peak
    at about one layer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
