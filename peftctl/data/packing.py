"""Rows of examples and the batches made of them.

With packing, several examples share a row of up to max_length tokens. Each keeps its own positions (restarting
at 0), which is what lets attention keep examples apart; labels already mask each example's first token, so no
example learns to predict across a boundary. Without packing, a row is one example and batches are padded.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from peftctl.data.tokenize import IGNORE


def pack_examples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the open row with the least room that fits it.

    It fills rows to ~99% on SFT-like lengths (first-fit in data order wastes about a tenth) and is deterministic.
    Returns rows as lists of example indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []  # sorted room left in each open row ...
    owner: list[int] = []  # ... and the row it belongs to, in the same order
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example {i} is longer ({need}) than a row ({capacity})")
        k = bisect.bisect_left(free, need)
        if k == len(free):
            rows.append([i])
            room, row = capacity - need, len(rows) - 1
        else:
            room, row = free.pop(k) - need, owner.pop(k)
            rows[row].append(i)
        if room > 0:
            j = bisect.bisect_left(free, room)
            free.insert(j, room)
            owner.insert(j, row)
    for row in rows:
        row.sort()  # data order inside a row, so a row reads like the dataset
    return rows


@dataclass
class Batch:
    input_ids: object  # LongTensor [rows, tokens]
    labels: object
    position_ids: object
    attention_mask: object | None  # None for packed rows: positions alone delimit the examples
    n_trained: int  # trained tokens (labels that count), known on the host with no device sync
    n_tokens: int  # real (non-padding) tokens
    # Packed rows: where each document starts in the rows laid end to end (int32, rows x tokens + 1 entries;
    # a row's trailing padding is one more document), and the longest document -- what a varlen kernel reads
    # instead of a mask. Counted here on the host, so no forward has to find them on the device.
    cu_seq_lens: object | None = None
    max_length: int = 0

    def pinned(self) -> Batch:
        """A copy in page-locked memory, so the copy to the GPU can run asynchronously."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.input_ids), pin(self.labels), pin(self.position_ids), pin(self.attention_mask),
                     self.n_trained, self.n_tokens, pin(self.cu_seq_lens), self.max_length)

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.attention_mask),
                     self.n_trained, self.n_tokens, move(self.cu_seq_lens), self.max_length)


def model_inputs(batch, *, prompt_learning: bool, documents: bool = False) -> dict:
    """Packed rows are delimited by position_ids alone: a 2D attention mask (or a cache) would make transformers
    skip the per-example mask, so none is passed and use_cache is always False. Prompt-learning methods prepend
    virtual tokens and cannot use position_ids; they get the padding mask only.

    documents: the model attends through a varlen kernel (peftctl/packed_attention.py), which reads the
    documents' boundaries from the batch; transformers passes these keyword arguments (its FlashAttentionKwargs)
    through every decoder layer to the attention function."""
    if prompt_learning:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    inputs = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    if documents and batch.cu_seq_lens is not None:
        inputs.update(document_kwargs(batch.cu_seq_lens, batch.max_length))
    return inputs


def document_kwargs(cu_seq_lens, max_length: int) -> dict:
    """The documents' boundaries under the names transformers passes through to the attention function."""
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
            "max_length_k": max_length}


def cumulative_lengths(lengths: list[int]):
    """Where each document starts, and the end: [0, l0, l0 + l1, ...] as int32, the form varlen kernels read."""
    import torch

    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def document_lengths(row_lengths: list[list[int]], width: int) -> list[int]:
    """Every document's length over the rows laid end to end: each row's examples, then its trailing padding as
    one more document (as its restarting position_ids already make it)."""
    lengths = []
    for row in row_lengths:
        lengths += row
        if width > sum(row):
            lengths.append(width - sum(row))
    return lengths


def collate(rows: list[list[dict]], pad_id: int, packed: bool, pad_to: int | None = None) -> Batch:
    """Tensors for a micro-batch. `rows` holds, per row, its examples (dicts with input_ids and labels)."""
    import torch

    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    if pad_to:
        width = max(width, pad_to)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = None if packed else torch.zeros(shape, dtype=torch.long)
    n_trained = n_tokens = 0
    row_lengths = [[len(e["input_ids"]) for e in row] for row in rows]
    for r, row in enumerate(rows):
        cursor = 0
        for example in row:
            ids, labs = example["input_ids"], example["labels"]
            n = len(ids)
            input_ids[r, cursor:cursor + n] = torch.tensor(ids, dtype=torch.long)
            labels[r, cursor:cursor + n] = torch.tensor(labs, dtype=torch.long)
            position_ids[r, cursor:cursor + n] = torch.arange(n)
            cursor += n
            n_tokens += n
            n_trained += sum(1 for x in labs if x != IGNORE)
        if attention_mask is not None:
            attention_mask[r, :cursor] = 1
        # Padding after the last example counts as one more document with its own positions, so in a packed row
        # it can neither see nor be seen by the real examples; its labels are ignored.
        position_ids[r, cursor:] = torch.arange(width - cursor)
    if packed and all(len(row) == 1 and len(row[0]["input_ids"]) == width for row in rows):
        # Full rows of one example each: the model's default positions are these, and leaving them out spares
        # transformers its check for packed documents (a host-device sync in every forward).
        position_ids = None
    cu_seq_lens, longest = None, 0
    if packed and position_ids is not None:
        lengths = document_lengths(row_lengths, width)
        cu_seq_lens = cumulative_lengths(lengths)
        longest = max(lengths)
    return Batch(input_ids, labels, position_ids, attention_mask, n_trained, n_tokens, cu_seq_lens, longest)
