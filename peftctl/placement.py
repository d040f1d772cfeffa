"""Where the frozen input embedding lives while training (model.input_embeddings), decided in one place for the
loop (host_embedding.py) and the memory plan (plan/estimate.py), which must agree. Imports nothing heavy.

The input embedding is a lookup table: a micro-batch reads only its own rows (2048 rows of an 8B model's 128,256
are 16 MiB), so it can stay in host memory and send just those rows, while on the GPU it costs vocabulary x
hidden bf16 (0.98 GiB on Llama 3 8B) for the whole run. That is worth it where memory is what the run is short of:
a quantised base with gradient checkpointing on, where the embedding is about a sixth of the peak. Elsewhere the
GPU copy stays (the transfer is small, but it is a host sync per forward pass).
"""

from __future__ import annotations

CHOICES = ("auto", "gpu", "cpu")


def host_blocker(*, world_size: int, prompt_learning: bool, embedding: str | None) -> str | None:
    """Why this run's input embedding cannot live in host memory (None: it can). `embedding` says why the model's
    own embedding does not qualify (tied to the head, trained, not a plain lookup), or is None."""
    if prompt_learning:
        return "prefix, prompt and p-tuning read the embedding's weights on the GPU"
    if world_size > 1:
        return "not verified with several processes (DDP/FSDP); use gpu"
    return embedding


def on_host(choice: str, *, device_type: str, quantised: bool, checkpointing: bool, blocker: str | None) -> bool:
    """Whether the lookup runs in host memory. `cpu` with a blocker is the caller's error to raise; on a CPU-only
    run the embedding is in host memory anyway, so nothing moves."""
    if choice == "gpu" or device_type != "cuda" or blocker is not None:
        return False
    return choice == "cpu" or (quantised and checkpointing)
