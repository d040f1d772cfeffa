"""Loading each base once and measuring every target on it: teacher-forced loss and greedy predictions.

Loss is summed per example over its trained tokens, from packed rows where the model's attention keeps packed
examples apart (checked as training checks it), else from padded rows; forward passes take at most
`tokens_per_batch` tokens, padding counted. Generation is batched with left padding and the KV cache, prompts
sorted by length so that a batch pads little; each prediction stops at the first end token. Adapters that peft can
switch (LoRA, IA3) share one loaded base, which is also evaluated with them disabled when `base` is a target. On a
GPU the forward passes run under the autocast dtype training used (the quantisation's compute dtype, or the base's
dtype), so a 4-bit adapter is measured as it was trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from peftctl.data.packing import collate, pack_examples
from peftctl.data.tokenize import IGNORE
from peftctl.errors import InvalidInput
from peftctl.eval.targets import Group, Target
from peftctl.model import base_model


@dataclass
class Settings:
    max_new_tokens: int = 128
    batch_size: int = 16  # prompts per generate() call
    tokens_per_batch: int = 16384  # tokens per loss forward pass
    max_length: int = 2048
    loss: bool = True
    generate: bool = True


@dataclass
class Measured:
    """One target's per-example results."""

    loss_sum: np.ndarray | None = None
    trained: np.ndarray | None = None
    predictions: list[str] | None = None
    generated_tokens: int = 0
    timings: dict = field(default_factory=dict)


def evaluate_groups(groups: list[Group], data, tokenizer, settings: Settings, *, report=None) -> dict[str, Measured]:
    """{target label: Measured}, loading one model per group and freeing it before the next."""
    import gc

    import torch

    results: dict[str, Measured] = {}
    for group in groups:
        t0 = time.perf_counter()
        model, names = _load_group(group)
        load_s = time.perf_counter() - t0
        if report:
            report(f"loaded {group.base.name} for {', '.join(m.label for m in group.members)} ({load_s:.1f} s)")
        packed = settings.loss and _packs(model, tokenizer)
        for target in group.members:
            with _active(model, target, names):
                results[target.label] = measure(model, data, tokenizer, settings, target, packed=packed)
            results[target.label].timings["load_s"] = round(load_s, 3)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _load_group(group: Group):
    """(model in eval mode, {label: peft adapter name})."""
    from peftctl.methods import runtime
    from peftctl.model import load_model, pick_device

    device = pick_device()
    base = load_model(group.base.recipe(), device)
    adapters = [m for m in group.members if m.kind == "adapter"]
    if not adapters:
        return base.eval(), {}
    model = runtime.load(base, adapters[0].adapter_dir)
    names = {adapters[0].label: "default"}
    for i, target in enumerate(adapters[1:], start=1):
        names[target.label] = f"target_{i}"
        add_adapter(model, target, names[target.label])
    return model.eval(), names


def add_adapter(model, target: Target, name: str) -> None:
    """Load one more adapter into a PeftModel, as strictly as the first (every tensor present, none unexpected)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    weights = target.adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise InvalidInput(f"{target.adapter_dir}: no adapter_model.safetensors")
    model.load_adapter(str(target.adapter_dir), adapter_name=name, is_trainable=False)
    stored = {k for k in load_file(str(weights), device="cpu")}
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    if stored != expected:
        raise InvalidInput(f"{target.adapter_dir}: the adapter does not fit its base model "
                           f"({len(expected - stored)} tensors missing, {len(stored - expected)} unexpected)")


class _active:
    """Make `target` the one the model computes: set its adapter, or disable them all for the base."""

    def __init__(self, model, target: Target, names: dict[str, str]):
        self.model, self.target, self.names = model, target, names
        self._disabled = None

    def __enter__(self):
        if self.target.label in self.names:
            if len(self.names) > 1:
                self.model.set_adapter(self.names[self.target.label])
        elif self.names:  # the base inside a shared group
            self._disabled = self.model.disable_adapter()
            self._disabled.__enter__()
        return self.model

    def __exit__(self, *exc):
        if self._disabled is not None:
            self._disabled.__exit__(*exc)


def _packs(model, tokenizer) -> bool:
    """Whether packed rows give each example its own loss on this model (the check training makes)."""
    from peftctl.model import check_packing_isolation, pick_device

    if _prompt_learning(model):
        return False
    base = base_model(model)
    try:
        isolated, _, _ = check_packing_isolation(base, pick_device(), len(tokenizer))
    except Exception:  # noqa: BLE001 - a model that cannot take position_ids at all: pad instead
        return False
    return isolated


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def measure(model, data, tokenizer, settings: Settings, target: Target, *, packed: bool) -> Measured:
    import torch

    out = Measured()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    dtype = autocast_dtype(target, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if settings.loss:
            t0 = time.perf_counter()
            out.loss_sum, out.trained = example_losses(model, data.examples, tokenizer.pad_token_id, packed=packed,
                                                       max_length=settings.max_length,
                                                       tokens_per_batch=settings.tokens_per_batch, device=device)
            out.timings["loss_s"] = round(time.perf_counter() - t0, 3)
        if settings.generate and data.generative:
            t0 = time.perf_counter()
            ids = generate_ids(model, [e.prompt_ids for e in data.examples], tokenizer,
                               max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, device=device)
            out.timings["generate_s"] = round(time.perf_counter() - t0, 3)
            out.generated_tokens = sum(len(x) for x in ids)
            out.predictions = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    return out


def autocast_dtype(target: Target, device):
    """Training's autocast dtype for this base on a GPU; none on the CPU (weights compute in their own dtype)."""
    import json

    import torch

    if device.type != "cuda":
        return None
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if target.base.quantization:
        return names.get(json.loads(target.base.quantization).get("compute_dtype"))
    return names.get(target.base.dtype)


def example_losses(model, examples, pad_id: int, *, packed: bool, max_length: int, tokens_per_batch: int, device):
    """(summed token loss, trained tokens) per example, as float64 and int64 arrays."""
    import torch
    import torch.nn.functional as F

    from peftctl.data.packing import model_inputs

    lengths = [len(e.input_ids) for e in examples]
    rows = pack_examples(lengths, max_length) if packed else [[i] for i in range(len(examples))]
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))  # similar widths batch together
    loss_sum = np.zeros(len(examples), dtype=np.float64)
    trained = np.array([e.n_trained for e in examples], dtype=np.int64)
    prompt_learning = _prompt_learning(model)
    for batch_rows in _batches(rows, [sum(lengths[i] for i in row) for row in rows], tokens_per_batch):
        batch = collate([[{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in row]
                         for row in batch_rows], pad_id, packed)
        owner = torch.full(batch.labels.shape, -1, dtype=torch.long)  # which example each position belongs to
        for r, row in enumerate(batch_rows):
            cursor = 0
            for i in row:
                owner[r, cursor:cursor + lengths[i]] = i
                cursor += lengths[i]
        batch = batch.to(device)
        logits = model(**model_inputs(batch, prompt_learning=prompt_learning)).logits
        logits = logits[:, -batch.labels.shape[1]:]  # prompt-learning methods add virtual positions in front
        labels = batch.labels[:, 1:]
        token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE, reduction="none").cpu().double()
        keep = labels.reshape(-1).cpu() != IGNORE
        sums = torch.zeros(len(examples), dtype=torch.float64)
        sums.index_add_(0, owner[:, 1:].reshape(-1)[keep], token_loss[keep])
        loss_sum += sums.numpy()
    return loss_sum, trained


def _batches(rows: list, widths: list[int], budget: int):
    """Consecutive rows (sorted widest first) whose count x widest row stays within the token budget."""
    batch: list = []
    widest = 0
    for row, width in zip(rows, widths):
        if batch and max(widest, width) * (len(batch) + 1) > budget:
            yield batch
            batch, widest = [], 0
        batch.append(row)
        widest = max(widest, width)
    if batch:
        yield batch


def generate_ids(model, prompts: list[list[int]], tokenizer, *, max_new_tokens: int, batch_size: int, device):
    """Greedy continuations (token ids, end token excluded) of each prompt, batched with left padding."""
    import torch

    from peftctl.generation_config import for_decoding

    config = for_decoding(model, tokenizer, max_new_tokens, 0.0)
    stops = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    pad = config.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start:start + batch_size] if prompts[i]]
        if not chunk:
            continue
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            input_ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention_mask[r, width - len(prompts[i]):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=config)
        for r, i in enumerate(chunk):
            new = output[r, width:].tolist()
            end = next((k for k, token in enumerate(new) if token in stops), len(new))
            results[i] = new[:end]
    return results
