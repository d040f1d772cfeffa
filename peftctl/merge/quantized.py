"""Quantised bases: the weights an adapter trained on a bitsandbytes base actually saw."""

from __future__ import annotations

from peftctl.errors import PeftctlError
from peftctl.merge.models import empty_model


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


def by_checkpoint_key(quantized: dict[str, bool], layout: dict) -> dict[str, bool]:
    """quantized_weights' model parameter names -> the checkpoint keys that hold them whole (layout.py)."""
    return {piece.key: transposed for name, transposed in quantized.items()
            for piece in layout.get(name, []) if piece.rows is None and piece.elements is None}


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
