"""The optimiser (AdamW, fused on the GPU) and the learning-rate schedule (warmup, then constant/linear/cosine)."""

from __future__ import annotations

import math


def build_optimizer(model, recipe, device):
    import torch

    training = recipe.training
    ratio = getattr(recipe.method, "loraplus_lr_ratio", None)
    groups = parameter_groups(model, training.learning_rate, training.weight_decay, ratio)
    if not groups:
        raise RuntimeError("the adapter has no trainable parameter")
    if training.optimizer != "adamw":
        return _bitsandbytes_optimizer(training.optimizer, groups, training.learning_rate, device)
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                          for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=True if fused else None)


def parameter_groups(model, learning_rate: float, weight_decay: float, ratio: float | None) -> list[dict]:
    """Optimiser groups, for every method. LoRA+ gives every B matrix `ratio` x the learning rate; A matrices, 1-D
    parameters (DoRA magnitudes) and LoRA embedding factors keep the base rate -- unlike peft's helper, which moves
    1-D parameters to B's rate, drops the weight decay and puts embeddings at 1e-6.

    No weight decay on 1-D parameters (biases, DoRA magnitudes) nor on IA3's scales: those start at 1 and multiply
    activations, so decaying them towards 0 would switch the adapted layers off."""
    base, boosted, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ratio and ".lora_B." in name:
            boosted.append(p)
        elif p.ndim < 2 or ".ia3_" in name:
            no_decay.append(p)
        else:
            base.append(p)
    groups = [{"params": base, "lr": learning_rate, "weight_decay": weight_decay, "name": "base"},
              {"params": no_decay, "lr": learning_rate, "weight_decay": 0.0, "name": "no_decay"}]
    if ratio:
        groups.append({"params": boosted, "lr": learning_rate * ratio, "weight_decay": weight_decay,
                       "name": "lora_B"})
    return [g for g in groups if g["params"]]


def _bitsandbytes_optimizer(name: str, groups: list[dict], learning_rate: float, device):
    """8-bit states (a quarter of AdamW's optimiser memory) and/or paged states (moved to the host under memory
    pressure instead of failing): bitsandbytes' optimisers, which need a CUDA GPU."""
    from peftctl.errors import InvalidInput

    if device.type != "cuda":
        raise InvalidInput(f"training.optimizer {name} needs a CUDA GPU (bitsandbytes' 8-bit and paged optimisers)",
                           hint="use training.optimizer: adamw on this machine")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


def warmup_steps(training, total_steps: int) -> int:
    if training.warmup_ratio is not None:
        return int(round(training.warmup_ratio * total_steps))
    return min(training.warmup_steps, max(0, total_steps - 1))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak rate at optimiser step `step` (0-based): ramps to 1 over `warmup` steps (the first
    step already learns), then decays to 0 at `total` for linear and cosine."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, training, total_steps: int):
    import torch

    warmup = warmup_steps(training, total_steps)
    kind = training.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, kind))
