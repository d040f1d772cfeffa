"""Verification: base + adapter against the merged shards, one decoder layer at a time."""

from __future__ import annotations

from pathlib import Path

from peftctl.errors import InvalidInput, PeftctlError
from peftctl.merge.deltas import apply_deltas
from peftctl.merge.models import empty_model
from peftctl.merge.quantized import quantized_weights, weight_transform
from peftctl.merge.safetensors_io import Checkpoint

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
MIN_EFFECT = 1e-6  # relative: below this the merged model is the base model, whatever the dtype
VERIFY_SEQUENCES, VERIFY_TOKENS = 4, 32


class VerificationFailed(PeftctlError):
    """The merged model does not compute what base + adapter computes (exit 1; nothing is written)."""


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
