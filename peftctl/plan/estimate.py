"""The estimate: what the loop keeps on the GPU at its peak, component by component, for one setting."""

from __future__ import annotations

from dataclasses import dataclass, replace

from peftctl import (
    fast_path as fast_path_rules,  # the parameter `fast_path` means "liger is there"
    placement,
)
from peftctl.plan.constants import (
    ACTIVATION_SCALE,
    ADAM_BYTES,
    ADAPTER_BYTES,
    AUTOCAST_COPY_BYTES,
    BACKWARD_TRANSIENT,
    DROPOUT_MASK_BYTES,
    DTYPE_BYTES,
    FAST_GATED_MLP_SAVED,
    FAST_NORM_ROW_BYTES,
    FUSED_LOSS_HIDDEN_COPIES,
    GATED_MLP_SAVED,
    GRADIENT_BYTES,
    INT8_ROW_SCALE,
    LOSS_BACKWARD_BYTES,
    LSE_BYTES,
    NF4_BLOCK,
    NF4_NESTED_BLOCK,
    NF4_NESTED_PER_TENSOR,
    NF4_PER_TENSOR,
    NORM_SAVED_BYTES,
    WORKSPACE,
    GiB,
    KiB,
)
from peftctl.plan.shape import ModelShape


@dataclass
class Component:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Setting:
    """What the estimate depends on besides the model: from the recipe, or changed by a remedy."""

    micro_batch_size: int
    max_length: int
    checkpointing: bool
    gradient_accumulation: int
    weights_dtype: str  # float32 | bfloat16 | float16 (auto resolved from config.json)
    bits: int | None  # 4 | 8 | None
    double_quant: bool
    upcast_embeddings: bool
    autocast: str | None  # the dtype the loop autocasts to on CUDA, or None
    attention: str  # sdpa | eager | flash_attention_2 | flex_attention | varlen (packed rows, fast_path's rule)
    fast_kernels: bool = False  # liger's RMSNorm, RoPE and SwiGLU (train/kernels.apply_fast_kernels)
    fused_loss: bool = False  # liger's fused linear cross-entropy (train/loss.build_loss): no logits
    adapter_input_casts: bool = True  # peft copies each adapter's input to fp32; the loop turns that off under
    #                                   autocast (train/kernels.skip_adapter_input_casts)
    attention_mask: bool = True  # SDPA gets a dense mask: packed rows of several examples, or padded rows (rows
    #                              of one whole example get none, and keep key/value heads unrepeated): assumed
    device: str = "cuda"  # the plan is for CUDA; "cpu" reproduces CPU kernels for tests (dropout, LayerNorm)
    triton: bool = False  # triton on the training machine: LoRA's dropout kernel runs where fast_path says it applies
    world_size: int = 1  # processes (GPUs) of a distributed run; the plan is then per GPU
    engine: str | None = None  # None (one process), ddp or fsdp (train/distributed.py)
    input_embeddings: str = "gpu"  # model.input_embeddings: auto | gpu | cpu (peftctl/placement.py decides)
    prompt_learning: bool = False  # prefix/prompt/p-tuning (they keep the input embedding on the GPU)
    keep_dequantized: bool = False  # quantization.keep_dequantized as decided (plan/verdict.py): 4-bit matrices kept

    def describe(self) -> str:
        base = {4: "4-bit nf4", 8: "8-bit"}.get(self.bits, self.weights_dtype)
        kept = ", its LoRA layers' matrices kept" if self.keep_dequantized else ""
        fast = ", liger fast path" if self.fast_kernels or self.fused_loss else ""
        per_gpu = f", {self.engine.upper()} over {self.world_size} GPUs (per GPU)" if self.engine else ""
        return (f"{self.micro_batch_size} x {self.max_length} tokens per micro-batch, {base} base{kept}, gradient "
                f"checkpointing {'on' if self.checkpointing else 'off'}{fast}{per_gpu}")


def setting_for(recipe, shape: ModelShape, checkpointing: bool, *, fast_path: bool | None = None,
                device: str = "cuda", triton: bool | None = None) -> Setting:
    """The loop's choices for this recipe on a CUDA device (`device`: "cpu" for what the loop does on the CPU).
    fast_path: whether liger-kernel is there; triton: whether triton is (LoRA's dropout kernel); each
    defaults to whether it can be imported here, where the plan runs."""
    from peftctl.data.prepare import largest_micro_batch_rows
    from peftctl.methods.registry import METHODS

    quant = recipe.quantization
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = shape.config_dtype if shape.config_dtype in DTYPE_BYTES else "float32"
    autocast = fast_path_rules.autocast_name(recipe)
    attention = recipe.model.attn_implementation
    fast = fast_path_rules.liger_available() if fast_path is None else fast_path
    prompt_learning = METHODS[recipe.method.name].prompt_learning
    if attention == "auto":
        # Packed rows take the first kernel of the loop's rule (it probes that one first on the GPU).
        packed = recipe.dataset.packing is not False and METHODS[recipe.method.name].can_pack
        first = fast_path_rules.packed_attention_candidates(
            setting="auto", packed=packed, device_type=device, dtype=autocast,
            refusal=shape.document_kernel_refusal)[0][0]
        attention = first if first in ("varlen", "flex_attention") else shape.attention
    rows = largest_micro_batch_rows(recipe.training, recipe.dataset.max_length)
    return Setting(micro_batch_size=rows, max_length=recipe.dataset.max_length,
                   checkpointing=checkpointing, gradient_accumulation=recipe.training.gradient_accumulation,
                   weights_dtype=dtype, bits=quant.bits if quant else None,
                   double_quant=bool(quant and quant.double_quant),
                   upcast_embeddings=bool(quant and quant.upcast_embeddings), autocast=autocast,
                   attention=attention,
                   fast_kernels=fast_path_rules.fast_kernels_apply(shape.model_type, fast),
                   fused_loss=fast_path_rules.fused_loss_applies(shape.model_type, plain_head=shape.plain_head,
                                                                 prompt_learning=prompt_learning, liger=fast),
                   adapter_input_casts=autocast is None, input_embeddings=recipe.model.input_embeddings,
                   prompt_learning=prompt_learning,
                   triton=_triton_for(shape) if triton is None else triton)


def _triton_for(shape: ModelShape) -> bool:
    """Whether triton imports here, asked only where a LoRA layer has dropout (its import costs a moment)."""
    return any(m.kind == "lora" and m.dropout > 0 for m in shape.adapted) and fast_path_rules.triton_available()


def weight_bytes(shape: ModelShape, s: Setting) -> int:
    """The frozen base as loaded: quantised linear layers, the rest in the weights' dtype."""
    wb = DTYPE_BYTES[s.weights_dtype]
    if s.bits == 4:
        quantised = 0
        for out_f, in_f in shape.linear_weights:
            n = out_f * in_f
            blocks = -(-n // NF4_BLOCK)
            if s.double_quant:  # 8-bit absmax per block, fp32 absmax per 256 blocks
                nested = 4 * -(-blocks // NF4_NESTED_BLOCK)
                quantised += n // 2 + blocks + nested + NF4_PER_TENSOR + NF4_NESTED_PER_TENSOR
            else:  # fp32 absmax per block
                quantised += n // 2 + 4 * blocks + NF4_PER_TENSOR
    elif s.bits == 8:
        quantised = sum(out_f * in_f + INT8_ROW_SCALE * out_f for out_f, in_f in shape.linear_weights)
    else:
        quantised = wb * sum(out_f * in_f for out_f, in_f in shape.linear_weights)
    other = shape.other_params * wb
    if s.upcast_embeddings:
        other += shape.embedding_params * (4 - wb)
    return quantised + other


def activation_bytes(shape: ModelShape, s: Setting) -> dict[str, float]:
    """Bytes per token (of the micro-batch) that autograd keeps: per decoder layer, and outside the layers."""
    a = 4 if s.weights_dtype == "float32" or s.upcast_embeddings else 2  # the residual stream and linear outputs
    aa = 2 if s.autocast else a  # attention runs in the autocast dtype
    h, i, nh, nkv, hd = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    seq = s.max_length + (0 if shape.prefix else shape.virtual_tokens)
    kv_len = seq + (shape.virtual_tokens if shape.prefix else 0)
    # packed rows and padding give SDPA a dense mask: transformers then repeats the key/value heads
    masked = s.attention == "eager" or (s.attention == "sdpa" and s.attention_mask)

    norm, row = NORM_SAVED_BYTES, 0
    if shape.layer_norm and not (s.autocast and s.device == "cuda"):
        norm = a  # CUDA autocast runs LayerNorm in fp32 (a saved fp32 copy); elsewhere it keeps its input's dtype
    elif s.fast_kernels and not shape.layer_norm:
        norm, row = a, FAST_NORM_ROW_BYTES  # liger's RMSNorm: its input as it is, and the inverse RMS per row
    norms = norm * (shape.norms_per_layer * h + (nh + nkv) * hd * shape.qk_norm) + row * shape.norms_per_layer
    if s.attention == "eager":
        # q, repeated k and v; the fp32 softmax output and its cast (plus the capped scores with soft-capping)
        attention = aa * 3 * nh * hd + (4 + aa + aa * shape.attn_softcap) * nh * kv_len
    else:
        # transformers repeats the key/value heads when SDPA gets a mask; our varlen call does without enable_gqa
        repeated = masked or (s.attention == "varlen" and fast_path_rules.varlen_repeats_kv())
        kv = nh if repeated else nkv
        attention = aa * (2 * nh * hd + 2 * kv * hd * kv_len / seq) + LSE_BYTES * nh  # q, out; k, v (+ prefix)
        if masked:
            attention += aa * kv_len  # SDPA turns the bool mask into a float bias in every layer, kept for backward
    mlp_saved = FAST_GATED_MLP_SAVED if s.fast_kernels and shape.mlp_saved == GATED_MLP_SAVED else shape.mlp_saved
    mlp = a * mlp_saved * i
    adapter = _adapter_bytes(shape, s, a) / max(1, shape.layers)
    per_layer = norms + attention + mlp + adapter
    outside = norm * h + row + a * h + (kv_len if masked else 0)  # final norm, last hidden state, bool mask
    transient = a * (BACKWARD_TRANSIENT[0] * i + BACKWARD_TRANSIENT[1] * h)
    return {"per_layer": per_layer, "norms": norms, "attention": attention, "mlp": mlp, "adapter": adapter,
            "outside": outside, "layer_input": a * h, "backward_transient": transient, "sequence": seq}


def _adapter_bytes(shape: ModelShape, s: Setting, a: int) -> float:
    """What the adapters themselves keep per token, over all layers.

    LoRA: lora_A keeps its input. peft copies that input to the adapter's fp32 first (cast_input_dtype_enabled),
    unless the loop turned that off (under autocast) or the layer is bitsandbytes' under CUDA autocast; without a
    copy and without dropout, siblings that read the same tensor (q/k/v, gate/up) keep it once. With dropout each
    layer keeps its own dropped-out input and the mask -- unless LoRA's dropout kernel runs there, which keeps the
    input itself (shared, as without dropout) and draws the mask again in the backward pass.
    """
    cuda = s.device == "cuda"
    total, shared = 0.0, set()
    for m in shape.adapted:
        if m.kind == "ia3":
            # the scaled tensor is kept for the vector's gradient: the output as it is, the input upcast to fp32
            # (peft's bitsandbytes layers skip the upcast under CUDA autocast: torch.is_autocast_enabled())
            if m.feedforward:
                total += (a if m.quantized_base and s.autocast and cuda else 4) * m.in_features
            else:
                total += a * m.out_features
            continue
        copies = s.adapter_input_casts and a == 2 and not (m.quantized_base and s.autocast and cuda)
        dropout_dtype = 4 if copies or a == 4 else 2  # the dtype dropout sees: the fp32 copy, or the input itself
        if m.dropout > 0 and not _dropout_kernel(m, s, a):
            mask = DROPOUT_MASK_BYTES if cuda else dropout_dtype  # the CPU kernel keeps a noise tensor instead
            saved = (2 if s.autocast else dropout_dtype) * m.in_features + mask * m.in_features
        elif copies or (s.autocast and a == 4):
            saved = (2 if s.autocast else 4) * m.in_features  # its own copy (autocast's bf16 one, or the fp32 one)
        else:
            key = (m.layer, m.role)
            # the attention output SDPA keeps anyway is this layer's input (the kernels return a view of a
            # (batch, seq, heads, head_dim) buffer, which the reshape to (batch, seq, hidden) does not copy)
            free = key in shared or (m.role == "attn_out" and s.attention != "eager")
            saved = 0 if free else a * m.in_features
            shared.add(key)
        total += saved + (2 if s.autocast else 4) * m.r
        if m.dora:
            total += 2 * a * m.out_features  # DoRA keeps the base output and the LoRA output to rescale them
    if s.bits == 8 and s.autocast and cuda:
        # LLM.int8 layers keep their input for the backward pass (MatMul8bitLt's ctx.tensors, which saved-tensor
        # hooks do not see); where an adapter already keeps that very tensor it costs nothing more
        total += sum(a * width for key, width in shape.linear_inputs.items()
                     if key not in shared and not (key[1] == "attn_out" and s.attention != "eager"))
    blocks, width = shape.bottleneck
    if blocks:
        # Our block computes in fp32: x.to(fp32), then `down` keeps its (autocast) input, the activation and `up`
        # keep theirs (width each)
        block_bytes = 2 if s.autocast else 4
        total += blocks * block_bytes * (shape.hidden + 2 * width)
    return total


def _fused_branch(m, s: Setting, a: int) -> bool:
    """Whether this layer runs through the fused LoRA branch (train/fused_lora.py): a plain LoRA layer whose input
    is in the dtype it computes in -- under autocast the autocast dtype (a = 2), without it the float32 adapter's
    own (a = 4); elsewhere peft's forward runs. Settings that keep peft's input casts under autocast describe peft's
    own layers (tests)."""
    return (m.kind == "lora" and not m.dora and not (s.adapter_input_casts and s.autocast)
            and a == (2 if s.autocast else 4))


def _dropout_kernel(m, s: Setting, a: int) -> bool:
    """Whether this LoRA layer's branch runs the dropout kernel (train/fused_lora.py asks the same rule per call):
    only in the fused branch (elsewhere peft's forward keeps its dropped copy)."""
    if not _fused_branch(m, s, a):
        return False
    elements = s.micro_batch_size * s.max_length * m.in_features
    return fast_path_rules.lora_dropout_kernel_applies(device_type=s.device, dropout=m.dropout,
                                                       dtype=s.autocast or "float32", r=m.r, elements=elements,
                                                       triton=s.triton)


def kept_matrices(shape: ModelShape, s: Setting) -> tuple[int, int]:
    """(layers, bytes) of the dequantised 4-bit matrices the run keeps where quantization.keep_dequantized is on
    (train/fused_lora.keep_dequantized, the same rule): the LoRA layers whose 4-bit linear base the fused branch
    computes, where the base computes in the activations' dtype (the weights' own: no upcast embeddings), each
    matrix in that dtype. Counted whether or not this setting keeps them (the plan asks first)."""
    compute = s.autocast or "float32"  # the quantised layers' compute dtype on CUDA
    if s.bits != 4 or s.upcast_embeddings or s.weights_dtype != compute:
        return 0, 0
    a = DTYPE_BYTES[compute]
    kept = [m for m in shape.adapted if m.quantized_base and m.linear_base and _fused_branch(m, s, a)]
    return len(kept), sum(a * m.in_features * m.out_features for m in kept)


def dropout_kernel_layers(shape: ModelShape, s: Setting) -> int:
    """How many adapted layers run LoRA's dropout kernel in this setting."""
    a = 4 if s.weights_dtype == "float32" or s.upcast_embeddings else 2  # as activation_bytes
    return sum(1 for m in shape.adapted if m.dropout > 0 and _dropout_kernel(m, s, a))


def estimate(shape: ModelShape, s: Setting, method_name: str = "") -> list[Component]:
    """The components of the peak, in bytes."""
    act = activation_bytes(shape, s)
    t = s.micro_batch_size * act["sequence"]  # tokens in a micro-batch (virtual tokens included)
    L = shape.layers
    logits = t * shape.vocab
    if s.fused_loss:  # never all the logits: a few hidden-state-sized buffers and one chunk of logits
        hidden_bytes = 2 if s.autocast else act["layer_input"] // shape.hidden
        chunk_mem = fast_path_rules.fused_loss_chunk_mem(s.checkpointing)
        chunk = fast_path_rules.fused_loss_chunk_rows(t, shape.vocab, shape.hidden, chunk_mem)
        loss = (FUSED_LOSS_HIDDEN_COPIES * shape.hidden * t + chunk * shape.vocab) * hidden_bytes + 4 * t
        loss_detail = (f"liger's fused linear cross-entropy: hidden-state-sized buffers and logits {chunk:,d} tokens "
                       "at a time")
    else:
        # soft-capped logits (Gemma 2) keep a tanh output of their own size in the autocast dtype
        loss = (LOSS_BACKWARD_BYTES + (2 if s.autocast else 4) * shape.logit_softcap) * logits
        loss_detail = f"{logits:,d} logits: fp32 log-probs + two fp32 gradients at the start of backward"
    if s.checkpointing:
        # the last layer recomputed at the start of the backward pass, with the gradient flowing into it; its
        # activations are then freed as fast as its gradients appear (measured: BENCHMARKS.md case 4)
        kept = L * act["layer_input"] * t
        during_layer = (act["per_layer"] + act["layer_input"]) * t
        how = (f"{L} layer inputs ({act['layer_input']:.0f} B/token each) + one layer recomputed "
               f"({act['per_layer'] / KiB:.1f} KiB/token)")
    else:
        kept = L * act["per_layer"] * t
        during_layer = act["backward_transient"] * t
        how = f"{L} layers x {t:,d} tokens x {act['per_layer'] / KiB:.1f} KiB/token"
    # The peak is at the start of the backward pass (all activations + the loss's buffers), unless one layer's
    # backward needs more than the loss did (small vocabularies; checkpointing: the recomputed layer).
    activations = ACTIVATION_SCALE * (kept + act["outside"] * t + max(0, during_layer - loss))
    p = shape.trainable
    # At the peak (the start of a backward pass) the gradients of this micro-batch do not exist yet: only those
    # accumulated from earlier micro-batches of the step (optimizer.zero_grad(set_to_none=True) frees them).
    if s.gradient_accumulation > 1:
        gradients, gradients_detail = GRADIENT_BYTES * p, "fp32, accumulated over the step's micro-batches"
    else:
        gradients, gradients_detail = GRADIENT_BYTES * p // max(1, L), "fp32; one layer's worth at the peak"
    weights, host = weight_bytes(shape, s), embedding_on_host(shape, s)
    table = shape.input_embedding * (4 if s.upcast_embeddings else DTYPE_BYTES[s.weights_dtype])
    components = [
        Component("base weights", weights - table if host else weights, _weights_detail(shape, s)),
        Component("adapter weights", ADAPTER_BYTES * p, f"{p:,d} fp32"),
        Component("gradients", gradients, gradients_detail),
        Component("AdamW states", ADAM_BYTES * p, "exp_avg + exp_avg_sq, fp32"),
    ]
    if host:
        components.append(Component("input embedding", 0, f"{table / GiB:.2f} GiB in host memory "
                                    "(model.input_embeddings); a micro-batch's rows are sent over"))
    if s.autocast and method_name not in ("ia3", "prompt_tuning"):
        # autocast's bf16 copies of the fp32 adapter weights, kept by the graph for the backward pass (with
        # checkpointing, only the recomputed layer's)
        copies = AUTOCAST_COPY_BYTES * p // (max(1, L) if s.checkpointing else 1)
        components.append(Component("autocast copies", copies, f"{s.autocast} copies of the adapter weights, "
                                    "kept for backward"))
    components.append(Component("activations", int(activations), how))
    components.append(Component("logits and loss", int(loss), loss_detail))
    kept_layers, kept_bytes = kept_matrices(shape, s) if s.keep_dequantized else (0, 0)
    if kept_layers:
        components.append(Component("kept dequantised weights", kept_bytes, f"{kept_layers} LoRA layers' 4-bit "
                                    "weights as matrices for the whole run (quantization.keep_dequantized)"))
    if s.bits is not None and shape.linear_weights and kept_layers < len(shape.linear_weights):
        out_f, in_f = max(shape.linear_weights, key=lambda w: w[0] * w[1])
        components.append(Component("dequantised weight", 2 * out_f * in_f, "the largest quantised layer, "
                                    "dequantised for its matmul"))
    if shape.expert_delta:
        kept_layers = 1 if s.checkpointing else shape.moe_layers
        size = 2 if s.autocast or s.weights_dtype in ("bfloat16", "float16") else 4
        components.append(Component("expert deltas", size * shape.expert_delta * kept_layers,
                                    f"W + B @ A of the adapted expert tensors, {kept_layers} layer(s), kept for "
                                    "backward (peft's parameter wrapper)"))
    dora = [m for m in shape.adapted if m.dora]
    if dora:
        largest = max(m.in_features * m.out_features for m in dora)
        components.append(Component("DoRA weight norm", 4 * largest, "B @ A of the largest DoRA layer in fp32, "
                                    "for its weight norm"))
    components.append(Component("workspace", WORKSPACE, "cuBLAS workspaces"))
    if s.engine in ("ddp", "fsdp") and s.world_size > 1:
        components = per_gpu(components, shape, s)
    return components


def embedding_on_host(shape: ModelShape, s: Setting) -> bool:
    """Whether the loop keeps the input embedding in host memory (train/host_embedding.py, the same rule)."""
    blocker = placement.host_blocker(world_size=s.world_size, prompt_learning=s.prompt_learning,
                                     embedding=shape.input_embedding_blocker)
    return placement.on_host(s.input_embeddings, device_type=s.device, quantised=s.bits is not None,
                             checkpointing=s.checkpointing, blocker=blocker)


def per_gpu(components: list[Component], shape: ModelShape, s: Setting) -> list[Component]:
    """One GPU's share of a distributed run (train/distributed.py). Every rank computes its own micro-batches, so
    activations and the loss are one process's. DDP keeps everything else too, plus its flat fp32 gradient
    buckets (allocated when it wraps the model). FSDP2 (each decoder layer sharded, then the rest) keeps 1/N of the
    base, adapter, gradients and AdamW states, plus what is unsharded at the peak: the root's parameters
    (embeddings, final norm, head: FSDP2 does not reshard the root after forward) and two decoder layers (the one
    the backward pass starts in and the one prefetched). Autocast's copies are of unsharded weights: not divided.
    NCCL's own buffers are outside PyTorch's allocator (like the CUDA context)."""
    n, p = s.world_size, shape.trainable
    if s.engine == "ddp":
        return components + [Component("DDP gradient buckets", GRADIENT_BYTES * p, f"{p:,d} fp32, all ranks")]
    sharded = ("base weights", "adapter weights", "gradients", "AdamW states")
    out = [replace(c, bytes=c.bytes // n, detail=f"1/{n} of {c.bytes / GiB:.2f} GiB ({c.detail})")
           if c.name in sharded else c for c in components]
    weights = weight_bytes(shape, s)
    root = shape.embedding_params * DTYPE_BYTES[s.weights_dtype] + shape.hidden * DTYPE_BYTES[s.weights_dtype]
    layer = (weights - root) / max(1, shape.layers) + ADAPTER_BYTES * p / max(1, shape.layers)
    out.append(Component("FSDP unsharded", int(root + 2 * layer), f"the root's {root / GiB:.2f} GiB (embeddings, "
                         f"head) + 2 decoder layers of {layer / GiB:.2f} GiB, all-gathered"))
    return out


def _weights_detail(shape: ModelShape, s: Setting) -> str:
    n_lin = sum(o * i for o, i in shape.linear_weights)
    kind = {4: "nf4" + (" + double-quant constants" if s.double_quant else " + fp32 absmax"), 8: "int8 + row scales"}
    rest = f"{shape.other_params:,d} {'fp32 embeddings, ' if s.upcast_embeddings else ''}{s.weights_dtype}"
    if s.bits is None:
        return f"{n_lin + shape.other_params:,d} x {s.weights_dtype}"
    return f"{n_lin:,d} {kind[s.bits]}; {rest}"
