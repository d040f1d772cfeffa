"""The memory plan: an estimate of peak GPU memory for a recipe, before anything is loaded."""

from __future__ import annotations


def needs_checkpointing(recipe, device) -> bool:
    """Whether the run needs gradient checkpointing to fit on `device` (a first estimate: weights plus the
    activations that a decoder layer keeps for the backward pass, against 90% of the card)."""
    import torch

    from peftctl.model import load_config

    config = load_config(recipe.model)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    vocab = getattr(config, "vocab_size", 0)
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = recipe.training.micro_batch_size * recipe.dataset.max_length
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
    bytes_per_weight = 0.55 if recipe.quantization and recipe.quantization.bits == 4 else (
        1.0 if recipe.quantization else 2.0)
    activations = tokens * layers * (18 * hidden + 6 * inter) * 2  # bf16 values kept per token per layer
    logits = tokens * vocab * 4 * 2
    need = params * bytes_per_weight + activations + logits
    total = torch.cuda.get_device_properties(device).total_memory
    return need > 0.9 * total
