"""The frozen input embedding in host memory (model.input_embeddings; the rule is in peftctl/placement.py).

`HostEmbedding` takes the place of the model's nn.Embedding after the adapter is attached: its forward copies the
token ids to the host, picks their rows there (the same gather as on the GPU, so the embeddings are bit for bit
the same) into a pinned buffer, and sends those rows to the GPU without blocking the host. The table itself is no
parameter or buffer of the model, so `.to()`, `model.device`, `state_dict()` and the optimiser never see it;
the run saves only the adapter, which this does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from peftctl import placement
from peftctl.errors import InvalidInput
from peftctl.model import base_model


class HostEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, device):
        super().__init__()
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"  # pinned rows go over asynchronously; a CPU "device" needs no pin
        # Ordinary (pageable) host memory: the host reads the table, only the picked rows travel, from a pinned
        # buffer. Pinning the table too cost a second 1 GiB copy and seconds of page-locking before the first step
        # (Llama 3's 128k x 4096 table), for nothing.
        weight = embedding.weight.detach().to("cpu")
        # not registered: the model's parameters, device and state_dict stay those of what is on the GPU
        self.__dict__["table"] = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        # hooks put on the embedding (transformers' and peft's enable_input_require_grads mark its output as
        # needing a gradient, for checkpointed layers) now act on this module's output, which is on the GPU
        for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                     "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            getattr(self, name).update(getattr(embedding, name))

    @property
    def weight(self) -> torch.Tensor:
        """The table in host memory (for code that reads the embedding's shape or dtype; it is no parameter)."""
        return self.table

    def host_parameters(self) -> list[torch.Tensor]:
        return [self.table]  # params.count_parameters counts it with the model's own

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")  # a host sync, at the start of a forward pass: the GPU is then only copying ids
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=self.pin)
        torch.index_select(self.table, 0, ids.reshape(-1), out=rows)
        return self.send(rows.view(*ids.shape, self.embedding_dim))

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        # non_blocking from pinned memory: the host goes on while the rows travel; the caching host allocator
        # keeps the buffer until the copy has finished
        return rows.to(self.device, non_blocking=self.pin)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, rows sent to {self.device}"


def why_not(model) -> str | None:
    """Why this model's own input embedding cannot move to the host (None: it can)."""
    base = base_model(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return f"its input embedding ({type(embedding).__name__}) is not a plain lookup table"
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return "its input embedding is tied to the output head, whose matmul needs it on the GPU"
    if embedding.weight.requires_grad:
        return "the method trains the input embedding"
    return None


def place_input_embeddings(model, choice: str, device, *, world_size: int, quantised: bool, checkpointing: bool,
                           prompt_learning: bool, where: str = "") -> bool:
    """Move the input embedding to host memory where the rule says so; True when it moved. An explicit
    `cpu` that cannot be honoured is bad input (exit 2)."""
    blocker = placement.host_blocker(world_size=world_size, prompt_learning=prompt_learning,
                                     embedding=why_not(model))
    if choice == "cpu" and blocker is not None and device.type == "cuda":
        raise InvalidInput(f"{where + ': ' if where else ''}model.input_embeddings: cpu: {blocker}",
                           hint="set model.input_embeddings: auto or gpu")
    if not placement.on_host(choice, device_type=device.type, quantised=quantised, checkpointing=checkpointing,
                             blocker=blocker):
        return False
    base = base_model(model)
    embedding = base.get_input_embeddings()
    base.set_input_embeddings(HostEmbedding(embedding, device))
    embedding.weight.data = torch.empty(0, dtype=embedding.weight.dtype, device=embedding.weight.device)  # free it
    return True
