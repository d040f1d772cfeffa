"""The plan: peak, card, verdict and the remedies that make a run fit; and what the training loop asks of it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from peftctl import fast_path as fast_path_rules  # the parameter `fast_path` means "liger is there"
from peftctl.plan import card as cards  # cards.local_card: patchable in tests
from peftctl.plan.card import Card
from peftctl.plan.constants import ALLOCATOR_SLACK, CUDA_CONTEXT, KEEP_DEQUANTIZED_HEADROOM, GiB
from peftctl.plan.estimate import Component, Setting, dropout_kernel_layers, estimate, kept_matrices, setting_for
from peftctl.plan.shape import ModelShape, model_shape


@dataclass
class MemoryPlan:
    setting: Setting
    components: list[Component]
    card: Card
    other: MemoryPlan | None = None  # the same recipe with gradient checkpointing the other way
    remedies: list[tuple[str, MemoryPlan | None]] = field(default_factory=list)  # None: advice, not a plan
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def needed(self) -> int:
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT

    @property
    def fits(self) -> bool | None:
        return None if not self.card.known else self.needed <= self.card.bytes

    def as_dict(self) -> dict:
        out = {"setting": self.setting.__dict__ | {"description": self.setting.describe()},
               "components": [{"name": c.name, "bytes": c.bytes, "gib": round(c.bytes / GiB, 3), "detail": c.detail}
                              for c in self.components],
               "peak_bytes": self.peak, "peak_gib": round(self.peak / GiB, 2),
               "needed_bytes": self.needed, "needed_gib": round(self.needed / GiB, 2),
               "card": {"name": self.card.name, "bytes": self.card.bytes}, "fits": self.fits, "notes": self.notes}
        if self.other is not None:
            out["other_checkpointing"] = {"gradient_checkpointing": self.other.setting.checkpointing,
                                          "peak_bytes": self.other.peak, "needed_bytes": self.other.needed,
                                          "fits": self.other.fits}
        out["remedies"] = [{"change": text, "peak_bytes": plan.peak if plan else None,
                            "needed_bytes": plan.needed if plan else None, "fits": plan.fits if plan else None}
                           for text, plan in self.remedies]
        return out


def plan_memory(recipe, counted=None, *, card: Card | None = None, checkpointing: bool | None = None,
                fast_path: bool | None = None, world_size: int = 1, engine: str | None = None,
                triton: bool | None = None) -> MemoryPlan:
    """The plan for a recipe. `counted` is params.count_for_recipe's result (its meta model is reused); the card
    defaults to the local GPU; checkpointing defaults to the recipe's setting, `auto` resolved by this plan;
    fast_path (liger-kernel on the training machine) and triton (LoRA's dropout kernel) default to whether they can
    be imported here; world_size and engine (ddp or fsdp) plan one GPU of a distributed run."""
    from peftctl.methods.registry import METHODS
    from peftctl.params import count_for_recipe

    counted = counted or count_for_recipe(recipe)
    shape = model_shape(counted.model, counted.config, recipe)
    card = card or cards.local_card()
    spec = METHODS[recipe.method.name]
    setting = recipe.training.gradient_checkpointing
    method = recipe.method.name

    keep = fast_path_rules.keep_dequantized_setting(recipe)

    def make(s: Setting) -> MemoryPlan:
        s = replace(s, world_size=world_size, engine=engine if world_size > 1 else None)
        if keep is True and kept_matrices(shape, s)[0]:  # asked for: every setting below keeps them
            s = replace(s, keep_dequantized=True)
        return MemoryPlan(s, estimate(shape, s, method), card)

    # LoRA's dropout kernel keeps no dropped copies (-17 GiB on 8B QLoRA all-linear 4 x 2048) but is slower than
    # torch's dropout (0.87x a decoder layer's LoRA branches in bf16 on the H200, BENCHMARKS.md): the loop takes it
    # only where the run does not fit without it and does with it -- never under checkpointing, where it saves
    # only one layer's copies
    off = make(setting_for(recipe, shape, False, fast_path=fast_path, triton=False))
    if off.fits is False and triton is not False:
        with_kernel = make(setting_for(recipe, shape, False, fast_path=fast_path, triton=triton))
        if dropout_kernel_layers(shape, with_kernel.setting) and (with_kernel.fits or setting is False):
            off = with_kernel
    on = make(setting_for(recipe, shape, True, fast_path=fast_path, triton=False)) if spec.can_checkpoint else None
    if checkpointing is None:
        checkpointing = setting if isinstance(setting, bool) else (on is not None and off.fits is False)
    chosen, other = (on, off) if checkpointing and on is not None else (off, on)
    chosen = _keep_matrices(chosen, keep, shape, make)
    chosen.other = other
    if setting == "auto":
        chosen.notes.append("gradient_checkpointing: auto -> " + ("on: the plan without it does not fit" if
                            chosen.setting.checkpointing else "off" + ("" if card.known else " (no card to plan for)")))
    if not spec.can_checkpoint:
        chosen.notes.append(f"{method} cannot use gradient checkpointing ({spec.cannot_checkpoint})")
    s = chosen.setting
    if s.fast_kernels or s.fused_loss:
        chosen.notes.append("liger-kernel's fast path assumed (it is importable here): "
                            + ", ".join(n for n, on in (("fused RMSNorm/RoPE/SwiGLU", s.fast_kernels),
                                                        ("fused linear cross-entropy", s.fused_loss)) if on))
    elif fast_path is None and not fast_path_rules.liger_available():
        chosen.notes.append("liger-kernel is not importable here: planned for the plain path (on a GPU with "
                            "peftctl[gpu] installed the peak is lower)")
    kernel_layers = dropout_kernel_layers(shape, s)
    if kernel_layers:
        chosen.notes.append(f"LoRA's dropout kernel assumed on {kernel_layers} layers (triton on the training "
                            "machine): no dropped copies of their inputs")
    if s.attention in ("varlen", "flex_attention"):
        chosen.notes.append(f"packed rows: {s.attention} attention assumed, no mask (the run probes it before the "
                            "first step and falls back to SDPA with a mask, which needs more)")
    elif s.attention == "sdpa" and s.attention_mask:
        chosen.notes.append("assumed: SDPA gets a mask (packed or padded rows); rows of one whole example need "
                            "less")
    if shape.experts[0]:
        chosen.notes.append(f"mixture of experts: all {shape.experts[0]} experts of each layer are resident (in the "
                            f"base weights); activations follow the {shape.experts[1]} routed per token")
    if chosen.fits is False:
        chosen.remedies = remedies(shape, chosen.setting, card, method, spec, recipe)
    return chosen


def _keep_matrices(chosen: MemoryPlan, keep, shape: ModelShape, make) -> MemoryPlan:
    """quantization.keep_dequantized (`keep`): true has every setting keep the matrices (`make`), wherever the fused
    branch computes a 4-bit layer; auto keeps them only with gradient checkpointing off (on, memory is what the run
    is short of) and where the plan with them leaves KEEP_DEQUANTIZED_HEADROOM of the card free. The note says
    which, and why not."""
    if keep is False or chosen.setting.bits != 4:
        return chosen
    layers, size = kept_matrices(shape, chosen.setting)
    name = f"quantization.keep_dequantized: {'auto -> ' if keep == 'auto' else ''}"
    if not layers:
        chosen.notes.append(name + "none kept: no LoRA layer here computes its 4-bit base in peftctl's fused branch "
                            "(plain LoRA on a linear layer, model.dtype equal to quantization.compute_dtype)")
        return chosen
    what = (f"{layers} 4-bit layers' matrices, {size / GiB:.1f} GiB (x's gradient, and the forward pass of "
            f"micro-batches of {fast_path_rules.BNB_DEQUANT_MIN_ROWS:,d} tokens or more, read them instead of "
            "dequantising)")
    if keep is True:
        chosen.notes.append(name + "kept: " + what)
        return chosen
    kept = make(replace(chosen.setting, keep_dequantized=True))
    card, why_not = chosen.card, None
    if chosen.setting.checkpointing:
        why_not = "gradient checkpointing is on"
    elif not card.known:
        why_not = "no card to plan for"
    elif kept.needed > (1 - KEEP_DEQUANTIZED_HEADROOM) * card.bytes:
        why_not = (f"with them ({size / GiB:.1f} GiB more) the run would need {kept.needed / GiB:.1f} GiB, over "
                   f"{1 - KEEP_DEQUANTIZED_HEADROOM:.0%} of the card")
    if why_not is not None:
        chosen.notes.append(name + "not kept: " + why_not)
        return chosen
    kept.notes = chosen.notes + [name + "kept: " + what]
    return kept


def remedies(shape: ModelShape, s: Setting, card: Card, method: str, spec,
             recipe) -> list[tuple[str, MemoryPlan | None]]:
    """What to change first, in order, each step on top of the previous ones, until the plan fits: gradient
    checkpointing, a smaller micro-batch with more accumulation (the same rows per step), a shorter max_length
    (it cuts examples, so it comes after the batch), a 4-bit base. Where no cut alone was enough, the 4-bit step
    starts from the whole length again and cuts only as much as it still needs. Past those, advice without a plan.
    """
    steps: list[tuple[str, MemoryPlan | None]] = []

    def plan(x: Setting) -> MemoryPlan:
        return MemoryPlan(x, estimate(shape, x, method), card)

    current = s
    if s.keep_dequantized:
        current = replace(current, keep_dequantized=False)
        steps.append(("quantization.keep_dequantized: false", plan(current)))
        if steps[-1][1].fits:
            return steps
    if not s.checkpointing and spec.can_checkpoint:
        current = replace(current, checkpointing=True)
        steps.append(("training.gradient_checkpointing: true", plan(current)))
        if steps[-1][1].fits:
            return steps
    if current.micro_batch_size > 1:
        rows = current.micro_batch_size * recipe.training.gradient_accumulation
        for mbs in _halvings(current.micro_batch_size, 1):
            candidate = replace(current, micro_batch_size=mbs)
            if plan(candidate).fits or mbs == 1:
                current = candidate
                accumulation = max(1, rows // mbs)
                steps.append((f"training.micro_batch_size: {mbs} with gradient_accumulation: {accumulation} (the "
                              f"same {rows} rows per step)", plan(current)))
                break
        if steps[-1][1].fits:
            return steps
    if current.max_length > 256:
        for length in _halvings(current.max_length, 256):
            candidate = replace(current, max_length=length)
            if plan(candidate).fits or length <= 256:
                current = candidate
                steps.append((f"dataset.max_length: {length} (longer examples are cut)", plan(current)))
                break
        if steps[-1][1].fits:
            return steps
    if current.bits is None and spec.works_on_4bit:
        # with a 4-bit base the examples may need less cutting, or none: undo the cut, then cut only as needed
        steps = [step for step in steps if not step[0].startswith("dataset.max_length")]
        current = replace(current, bits=4, double_quant=True, upcast_embeddings=False, max_length=s.max_length,
                          autocast=current.autocast or "bfloat16")
        which = "method.name: qlora" if method == "lora" else "quantization: {bits: 4}"
        steps.append((f"{which} (a 4-bit nf4 base)", plan(current)))
        if steps[-1][1].fits:
            return steps
        if current.max_length > 256:
            for length in _halvings(current.max_length, 256):
                if plan(replace(current, max_length=length)).fits or length <= 256:
                    break
            current = replace(current, max_length=length)
            steps.append((f"dataset.max_length: {length} (longer examples are cut)", plan(current)))
            if steps[-1][1].fits:
                return steps
    steps.append(("then only a card with more memory, or several GPUs, will do", None))
    return steps


def _halvings(n: int, floor: int) -> list[int]:
    """n // 2, n // 4, ... down to `floor` (included once); empty when n <= floor."""
    out, m = [], n
    while m > floor:
        m = max(floor, m // 2)
        out.append(m)
    return out


# --- for the training loop -------------------------------------------------------------------------------------

def describe_plan(recipe, card: Card | None = None) -> str:
    """The plan in two lines, for messages (the loop's out-of-memory stop)."""
    plan = plan_memory(recipe, card=card)
    parts = {c.name: c.bytes for c in plan.components}
    adapter = sum(parts.get(k, 0) for k in ("adapter weights", "gradients", "AdamW states", "autocast copies"))
    main = (("base weights", parts.get("base weights", 0)), ("adapter + optimiser", adapter),
            ("activations", parts.get("activations", 0)), ("logits and loss", parts.get("logits and loss", 0)))
    rest = plan.peak - sum(n for _, n in main)
    terms = " + ".join(f"{name} {n / GiB:.1f}" for name, n in main) + f" + other {rest / GiB:.1f}"
    card_text = f" of {plan.card.name}'s {plan.card.bytes / GiB:.1f} GiB" if plan.card.known else ""
    return (f"memory plan ({plan.setting.describe()}): peak {plan.peak / GiB:.1f} GiB = {terms}\n"
            f"needed with the CUDA context and allocator slack: {plan.needed / GiB:.1f} GiB{card_text}")


def needs_checkpointing(recipe, device) -> bool:
    """Whether the run needs gradient checkpointing to fit on `device`: only when the plan without it does not
    fit the card (training.gradient_checkpointing: auto)."""
    return memory_mode(recipe, device)[0]


class MemoryMode(NamedTuple):
    checkpointing: bool
    dropout_kernel: bool  # LoRA's dropout kernel
    keep_dequantized: bool  # the 4-bit layers' matrices kept for the whole run


def memory_mode(recipe, device) -> MemoryMode:
    """What this plan decides for a run on `device`: with `gradient_checkpointing: auto`, checkpointing only where
    the plan without it does not fit the card (after the dropout kernel was tried); the kernel only where it makes
    the run fit without checkpointing; the kept 4-bit matrices as _keep_matrices says."""
    from peftctl.methods.registry import METHODS

    setting = recipe.training.gradient_checkpointing
    keep = fast_path_rules.keep_dequantized_setting(recipe)
    has_dropout = (getattr(recipe.method, "dropout", 0) or 0) > 0  # the kernel's layers: the plan counts them
    asks_plan = (keep == "auto" or has_dropout) and setting is not True
    asks_plan |= setting == "auto" and METHODS[recipe.method.name].can_checkpoint
    if not asks_plan:
        return MemoryMode(setting is True, False, keep is True)
    plan = plan_memory(recipe, card=cards.local_card(device))
    return MemoryMode(plan.setting.checkpointing, bool(plan.setting.triton), plan.setting.keep_dequantized)
