"""The memory plan: peak GPU memory of a training run, estimated before anything is loaded.

It follows what peftctl's loop really keeps on the GPU (train/loop.py, train/loss.py, train/kernels.py): the frozen
base weights as loaded (bf16, or bitsandbytes 4/8-bit with embeddings and lm_head left unquantised), the adapter in
float32 with its gradients and AdamW's two float32 states, the tensors autograd saves for the backward pass of
every decoder layer for one micro-batch (or, with gradient checkpointing, each layer's input plus one layer
recomputed), and the loss. Two paths, as the loop takes them:

- the fast path (a CUDA device with liger-kernel installed, for the model types it patches): liger's RMSNorm and
  SwiGLU keep less than transformers' own, and its fused linear cross-entropy never materialises the logits;
- the plain path: the loop takes logits for all positions, `.float()`s them and calls cross_entropy, so float32
  log-probs and two float32 gradients of that size are alive together at the start of the backward pass.

Under autocast the loop also stops peft from copying each adapter's input to float32 (kernels.
skip_adapter_input_casts), so adapted layers that read the same input (q/k/v, gate/up) keep it once.

    peak   = base weights + adapter + AdamW states (+ gradients accumulated so far + autocast copies)
             + activations kept for the backward pass + the loss's buffers (or one layer's backward, if larger)
             + dequantisation buffer + workspace
    needed = peak x (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT

The peak falls at the start of a backward pass: everything the forward pass kept is alive, this micro-batch's
gradients do not exist yet.

Several GPUs (train/distributed.py): `plan_memory(..., world_size=N, engine="ddp"|"fsdp")` plans one GPU's share
(per_gpu below); activations are never divided, since every rank computes its own micro-batches.

`peak` is what `torch.cuda.max_memory_allocated()` reports; `needed` is what the card must hold. Every constant
sits in the block below with where it came from; `scripts/measure_memory.py` measures real peaks on a GPU to
calibrate them (bytes per token per layer are printed beside each estimate for that purpose).

The activation model is for decoder-only transformers of the llama family (llama, mistral, qwen2, gemma, phi3...);
other architectures get the same model from their config sizes, with a wider error. Mixture-of-experts layers are
not modelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from peftctl import fast_path as fast_path_rules  # the parameter `fast_path` below means "liger is there"
from peftctl.errors import InvalidInput
from peftctl.params import is_tuner_layer

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
# The fast path's measured peaks, 2026-11-28, one H200 (BENCHMARKS.md's cases 1-4), which this plan
# reproduces within 2% (+0.3% to +1.6%; tests/test_plan.py::test_plan_reproduces_the_h200_benchmarks; case 4
# showed when gradients and autocast copies exist at the peak, so it is not independent): bf16 LoRA q,k,v,o
# 4 x 2048 full rows 50.51 GiB, packed rows 54.53 GiB; QLoRA all-linear 4 x 2048 57.89 GiB; 1 x 2048 checkpointed
# 6.89 GiB.

# --- constants: the one place to calibrate -------------------------------------------------------------------
# Weights (exact; checked against the storage of real bitsandbytes layers on a tiny model in tests/test_plan.py)
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights (transformers' BitsAndBytesConfig default)
NF4_NESTED_BLOCK = 256  # double quantisation: the absmax values are 8-bit, with one fp32 absmax per 256 of them
NF4_PER_TENSOR = 64  # the nf4/fp4 code book: 16 fp32 values per quantised tensor
NF4_NESTED_PER_TENSOR = 1024 + 4  # double quantisation's 256-entry fp32 code book and its fp32 offset
INT8_ROW_SCALE = 4  # LLM.int8: one fp32 scale (SCB) per output row
# The adapter and its optimiser (peft casts adapter weights to fp32: autocast_adapter_dtype=True; ours are fp32)
ADAPTER_BYTES = 4
GRADIENT_BYTES = 4  # gradients have the parameters' dtype (all of them count only with gradient accumulation)
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32 like the parameters (fused AdamW keeps no more)
AUTOCAST_COPY_BYTES = 2  # autocast keeps a bf16/fp16 copy of each fp32 weight it feeds a matmul, saved for backward
# Activations, per element saved for the backward pass (counted with autograd's saved-tensor hooks on CPU,
# tests/test_plan.py; the CUDA kernels' differences are noted where they matter)
NORM_SAVED_BYTES = 4  # RMSNorm/LayerNorm upcast their input to fp32 and keep that copy
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask (the CPU kernel keeps a float tensor instead)
LSE_BYTES = 4  # SDPA (flash, efficient, cuDNN) keeps an fp32 logsumexp per head and query
ACT_FN_SAVED = {  # elements of the MLP's intermediate width a non-gated activation keeps (gated MLPs: 3, below)
    "gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2,  # python composites: input, tanh, and two products
}
GATED_MLP_SAVED = 3  # act(gate) * up keeps gate (for act's backward), act(gate) and up
FAST_GATED_MLP_SAVED = 2  # liger's SwiGLU/GeGLU keeps gate and up only (ops/swiglu.py: save_for_backward(a, b))
FAST_NORM_ROW_BYTES = 4  # liger's RMSNorm keeps its input as it is plus an fp32 inverse RMS per row
# liger's fused linear cross-entropy (ops/fused_linear_cross_entropy.py, chunk_mem_const 1): the final hidden
# state, its flattened copy, the input gradient it computes in the forward pass and keeps, and one chunk of
# logits sized like the hidden states: 4 x hidden elements per token, plus an fp32 loss per token
FUSED_LOSS_HIDDEN_COPIES = 4
BACKWARD_TRANSIENT = (3, 4)  # one layer's backward: ~3 gradients of the MLP width and ~4 of the hidden width
#                              (estimate, not measured; it matters only where a layer outweighs the loss)
ACTIVATION_SCALE = 1.0  # calibration knob on all activations: set from scripts/measure_memory.py's table
#                         (its "ACTIVATION_SCALE that fits" line); 1.0 = the saved-tensor counts as they are
# The loss (train/loss.py): logits in the autocast dtype, .float() -> fp32, log_softmax keeps its fp32 output; in
# the backward pass nll's fp32 gradient and log_softmax's fp32 gradient join it: 12 bytes per logit at once.
LOSS_BACKWARD_BYTES = 4 + 4 + 4
# The card (estimates until measured: measure_memory.py reports max_memory_reserved beside the allocated peak)
WORKSPACE = 64 * MiB  # cuBLAS/cuBLASLt workspaces, taken from PyTorch's caching allocator (32 MiB each on Hopper)
CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context and kernel images: outside max_memory_allocated (nvidia-smi sees it)
ALLOCATOR_SLACK = 0.08  # the caching allocator reserves more than it hands out (block rounding, fragmentation)
# Cross-check with the reference H200 figures of BENCHMARKS.md (HF Trainer, so not the same loop): bf16 LoRA
# q,k,v,o at 4 x 2048 with checkpointing measured 29.0 GiB; this plan says 29.2 GiB for peftctl's loop.

ATTENTION_INPUT_NAMES = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "W_pack", "Wqkv"}
MLP_INPUT_NAMES = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3"}
ATTENTION_OUTPUT_NAMES = {"o_proj", "out_proj", "wo"}  # (and GPT-2's attn.c_proj): they read the attention output
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --- the model's shape, from the meta model with its adapter attached ------------------------------------------

@dataclass
class Adapted:
    """One adapted linear layer: what its adapter keeps for the backward pass depends on these."""

    kind: str  # lora | ia3
    layer: str  # the decoder layer it sits in (its module path), to find inputs it shares with its siblings
    role: str  # attn_in | mlp_in | the module's own name: siblings with the same role read the same input
    in_features: int
    out_features: int
    r: int = 0
    dropout: float = 0.0
    dora: bool = False
    quantized_base: bool = False
    feedforward: bool = False  # ia3: scales the input instead of the output


@dataclass
class ModelShape:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    config_dtype: str | None
    mlp_saved: float  # elements of the intermediate width the MLP keeps per token
    norms_per_layer: int
    qk_norm: bool
    layer_norm: bool  # torch's LayerNorm (GPT-2...): autocast decides its dtype; RMSNorms upcast in their own code
    attention: str  # what transformers picked for this config when the recipe says auto (sdpa; eager for Gemma 2)
    attn_softcap: bool  # tanh soft-capping of attention scores (Gemma 2): one more saved score tensor
    logit_softcap: bool  # tanh soft-capping of the logits: one more saved logits tensor
    plain_head: bool  # logits are lm_head(hidden): a frozen Linear (the fused loss needs that)
    linear_weights: list[tuple[int, int]]  # (out, in) of every linear layer bitsandbytes would quantise
    linear_inputs: dict[tuple[str, str], int]  # (layer, role) -> width of the input those linear layers read
    other_params: int  # everything else of the base: embeddings, lm_head, norms, biases
    embedding_params: int  # input and output embeddings (counted once when tied)
    adapted: list[Adapted] = field(default_factory=list)
    trainable: int = 0
    bottleneck: tuple[int, int] = (0, 0)  # (blocks, width) of our bottleneck adapter
    virtual_tokens: int = 0  # prompt/p-tuning: extra positions in every activation; prefix: extra keys/values
    prefix: bool = False
    experts: tuple[int, int] = (0, 0)  # MoE: (experts per layer, routed per token); all resident, top-k active
    expert_delta: int = 0  # MoE: elements of the adapted expert tensors of one layer (peft adds B @ A to each)
    moe_layers: int = 0


def _moe_shape(model, text) -> dict:
    """What a mixture-of-experts model changes in the plan: every expert's weights are resident (counted with
    the other weights), but a token's activations follow its top-k routed experts (and the shared ones), and
    peft's parameter wrapper materialises W + B @ A of each adapted expert tensor at every forward, which the
    grouped matmul keeps for the backward pass."""
    from peftctl.methods.moe import is_expert_tensor

    experts = [(n, p) for n, p in model.named_parameters() if is_expert_tensor(n, p)]
    if not experts:
        return {}
    total = experts[0][1].shape[0]
    top_k = _first(text, "num_experts_per_tok", "experts_per_token", "moe_topk", default=1) or 1
    expert_width = _first(text, "moe_intermediate_size", "intermediate_size", default=0)
    shared = ((_first(text, "n_shared_experts", default=0) or 0) * expert_width
              + (_first(text, "shared_expert_intermediate_size", default=0) or 0))
    adapted = [m.get_param() for m in model.modules() if getattr(m, "parameter_name", None) and
               hasattr(m, "get_param")]
    adapted = [p for p in adapted if p.ndim == 3]
    layers = len({n.split(".experts")[0] for n, _ in experts})
    delta = sum(p.numel() for p in adapted) // max(1, layers)
    return {"intermediate": top_k * expert_width + shared, "experts": (total, top_k), "expert_delta": delta,
            "moe_layers": layers}


def model_shape(model, config, recipe) -> ModelShape:
    """Read what the plan needs from a meta model with the recipe's adapter attached (params.attach_on_meta)."""
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(text, "num_key_value_heads", "n_kv_heads", default=heads) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    intermediate = _first(text, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    vocab = _first(text, "vocab_size")
    quant = recipe.quantization

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    output_embeddings = base.get_output_embeddings()
    input_embeddings = base.get_input_embeddings()
    embedding_ids = {id(p) for m in (input_embeddings, output_embeddings) if m is not None for p in m.parameters()}
    linear_weights, linear_ids, linear_inputs, adapted = [], set(), {}, []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if (cls in ("Linear", "Conv1D") and module is not output_embeddings and not is_tuner_layer(module)
                and not module.weight.requires_grad):
            out_f, in_f = _features(module)
            linear_weights.append((out_f, in_f))
            key = _input_key(name.removesuffix(".base_layer"))
            if key is not None:
                linear_inputs[key] = in_f
            linear_ids.add(id(module.weight))
        info = _adapted(name, module, quant is not None)
        if info is not None:
            adapted.append(info)
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in linear_ids)
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)

    layer0 = _first_decoder_layer(base, layers)
    norms, qk_norm, gated, layer_norm = 2, False, True, False
    if layer0 is not None:
        norm_names = [n for n, m in layer0.named_modules() if "norm" in type(m).__name__.lower() and n]
        layer_norm = any(type(m).__name__ == "LayerNorm" for m in layer0.modules())
        qk_norm = any(n.rsplit(".", 1)[-1] in ("q_norm", "k_norm") for n in norm_names)
        norms = sum(1 for n in norm_names if "." not in n) or 2
        leaf_names = {n.rsplit(".", 1)[-1] for n, _ in layer0.named_modules()}
        leaf_names |= {n.rsplit(".", 1)[-1] for n, _ in layer0.named_parameters()}  # fused experts' gate_up_proj
        gated = bool(leaf_names & {"gate_proj", "gate_up_proj", "w1", "w3"})
    activation = str(getattr(text, "hidden_act", None) or getattr(text, "activation_function", "") or "")
    mlp_saved = GATED_MLP_SAVED if gated else ACT_FN_SAVED.get(activation, 1)

    moe = _moe_shape(model, text)
    intermediate = moe.pop("intermediate", intermediate)
    method = recipe.method
    bottleneck = (0, 0)
    if hasattr(model, "bottleneck_adapters"):
        blocks = list(model.bottleneck_adapters.values())
        bottleneck = (len(blocks), blocks[0].down.out_features if blocks else 0)
    return ModelShape(
        model_type=getattr(config, "model_type", "?"), layers=layers, hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate, vocab=vocab,
        config_dtype=_dtype_name(getattr(text, "dtype", None) or getattr(config, "torch_dtype", None)),
        mlp_saved=mlp_saved, norms_per_layer=norms, qk_norm=qk_norm, layer_norm=layer_norm,
        attention=str(getattr(base.config, "_attn_implementation", None) or "sdpa"),
        attn_softcap=getattr(text, "attn_logit_softcapping", None) is not None,
        plain_head=type(output_embeddings).__name__ == "Linear" and not any(
            p.requires_grad for p in output_embeddings.parameters()),
        logit_softcap=getattr(text, "final_logit_softcapping", None) is not None, linear_weights=linear_weights,
        linear_inputs=linear_inputs,
        other_params=other, embedding_params=embedding, adapted=adapted,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), bottleneck=bottleneck,
        virtual_tokens=getattr(method, "num_virtual_tokens", 0) or 0, prefix=method.name == "prefix_tuning",
        **moe)


def _first(config, *names, default=0):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    return str(value).replace("torch.", "")


def _features(module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def _first_decoder_layer(model, layers: int):
    from peftctl.model import decoder_layers

    try:
        return decoder_layers(model, layers)[0] if layers else None
    except ValueError:
        return None


def _input_key(name: str) -> tuple[str, str] | None:
    """(decoder layer, role) of a linear layer: siblings with the same role read the same input tensor
    (q/k/v: attn_in; gate/up: mlp_in); None outside the numbered decoder layers."""
    match = re.match(r"(.*?\.\d+)\.(.+)$", name)
    if not match:
        return None
    layer, rest = match.groups()
    leaf = rest.rsplit(".", 1)[-1]
    if leaf in ATTENTION_INPUT_NAMES:
        return layer, "attn_in"
    if leaf in MLP_INPUT_NAMES:
        return layer, "mlp_in"
    if leaf in ATTENTION_OUTPUT_NAMES or (leaf == "c_proj" and "attn" in rest):
        return layer, "attn_out"
    return layer, rest


def _adapted(name: str, module, quantized: bool) -> Adapted | None:
    """The Adapted record of a peft tuner layer (LoRA, DoRA, IA3); None for anything else."""
    if not is_tuner_layer(module):
        return None
    layer, role = _input_key(name) or (name, name)
    in_f, out_f = getattr(module, "in_features", 0), getattr(module, "out_features", 0)
    if hasattr(module, "lora_A") and len(module.lora_A):
        key = next(iter(module.lora_A))
        dropout = module.lora_dropout[key]
        return Adapted("lora", layer, role, in_f, out_f, r=module.r[key], dropout=float(getattr(dropout, "p", 0.0)),
                       dora=bool(module.use_dora.get(key, False)), quantized_base=quantized)
    if hasattr(module, "ia3_l") and len(module.ia3_l):
        return Adapted("ia3", layer, role, in_f, out_f, feedforward=bool(module.is_feedforward),
                       quantized_base=quantized)
    return None


# --- the estimate ----------------------------------------------------------------------------------------------

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
    attention: str  # sdpa | eager | flash_attention_2 | flex_attention
    fast_kernels: bool = False  # liger's RMSNorm, RoPE and SwiGLU (train/kernels.apply_fast_kernels)
    fused_loss: bool = False  # liger's fused linear cross-entropy (train/loss.build_loss): no logits
    adapter_input_casts: bool = True  # peft copies each adapter's input to fp32; the loop turns that off under
    #                                   autocast (train/kernels.skip_adapter_input_casts)
    attention_mask: bool = True  # SDPA gets a dense mask: packed rows of several examples, or padded rows (rows
    #                              of one whole example get none, and keep key/value heads unrepeated): assumed
    device: str = "cuda"  # the plan is for CUDA; "cpu" reproduces CPU kernels for tests (dropout, LayerNorm)
    world_size: int = 1  # processes (GPUs) of a distributed run; the plan is then per GPU
    engine: str | None = None  # None (one process), ddp or fsdp (train/distributed.py)

    def describe(self) -> str:
        base = {4: "4-bit nf4", 8: "8-bit"}.get(self.bits, self.weights_dtype)
        fast = ", liger fast path" if self.fast_kernels or self.fused_loss else ""
        per_gpu = f", {self.engine.upper()} over {self.world_size} GPUs (per GPU)" if self.engine else ""
        return (f"{self.micro_batch_size} x {self.max_length} tokens per micro-batch, {base} base, gradient "
                f"checkpointing {'on' if self.checkpointing else 'off'}{fast}{per_gpu}")


def setting_for(recipe, shape: ModelShape, checkpointing: bool, *, fast_path: bool | None = None) -> Setting:
    """The loop's choices for this recipe on a CUDA device. fast_path: whether liger-kernel is there (default:
    whether it can be imported here, where the plan runs)."""
    from peftctl.methods.registry import METHODS

    quant = recipe.quantization
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = shape.config_dtype if shape.config_dtype in DTYPE_BYTES else "float32"
    autocast = fast_path_rules.autocast_name(recipe)
    attention = recipe.model.attn_implementation
    fast = fast_path_rules.liger_available() if fast_path is None else fast_path
    prompt_learning = METHODS[recipe.method.name].prompt_learning
    rows = recipe.training.micro_batch_size
    if recipe.training.micro_batch_tokens:  # the budget in rows of max_length (padding counted, as the loop does)
        rows = max(1, -(-recipe.training.micro_batch_tokens // recipe.dataset.max_length))
    return Setting(micro_batch_size=rows, max_length=recipe.dataset.max_length,
                   checkpointing=checkpointing, gradient_accumulation=recipe.training.gradient_accumulation,
                   weights_dtype=dtype, bits=quant.bits if quant else None,
                   double_quant=bool(quant and quant.double_quant),
                   upcast_embeddings=bool(quant and quant.upcast_embeddings), autocast=autocast,
                   attention=shape.attention if attention == "auto" else attention,
                   fast_kernels=fast_path_rules.fast_kernels_apply(shape.model_type, fast),
                   fused_loss=fast_path_rules.fused_loss_applies(shape.model_type, plain_head=shape.plain_head,
                                                                 prompt_learning=prompt_learning, liger=fast),
                   adapter_input_casts=autocast is None)


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
        kv = nh if masked else nkv  # transformers repeats the key/value heads when SDPA gets a mask
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
    layer keeps its own dropped-out input and the mask.
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
        if m.dropout > 0:
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


def estimate(shape: ModelShape, s: Setting, method_name: str = "") -> list[Component]:
    """The components of the peak, in bytes."""
    act = activation_bytes(shape, s)
    t = s.micro_batch_size * act["sequence"]  # tokens in a micro-batch (virtual tokens included)
    L = shape.layers
    logits = t * shape.vocab
    if s.fused_loss:  # no logits at all: a few hidden-state-sized buffers
        hidden_bytes = 2 if s.autocast else act["layer_input"] // shape.hidden
        loss = FUSED_LOSS_HIDDEN_COPIES * hidden_bytes * shape.hidden * t + 4 * t
        loss_detail = "liger's fused linear cross-entropy: no logits, hidden-state-sized buffers"
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
    components = [
        Component("base weights", weight_bytes(shape, s), _weights_detail(shape, s)),
        Component("adapter weights", ADAPTER_BYTES * p, f"{p:,d} fp32"),
        Component("gradients", gradients, gradients_detail),
        Component("AdamW states", ADAM_BYTES * p, "exp_avg + exp_avg_sq, fp32"),
    ]
    if s.autocast and method_name not in ("ia3", "prompt_tuning"):
        # autocast's bf16 copies of the fp32 adapter weights, kept by the graph for the backward pass (with
        # checkpointing, only the recomputed layer's)
        copies = AUTOCAST_COPY_BYTES * p // (max(1, L) if s.checkpointing else 1)
        components.append(Component("autocast copies", copies, f"{s.autocast} copies of the adapter weights, "
                                    "kept for backward"))
    components.append(Component("activations", int(activations), how))
    components.append(Component("logits and loss", int(loss), loss_detail))
    if s.bits is not None and shape.linear_weights:
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


# --- the plan: peak, card, verdict, remedies -----------------------------------------------------------------

@dataclass
class Card:
    bytes: int | None
    name: str  # "NVIDIA H200", "--gpu-memory 24GiB", or why there is none

    @property
    def known(self) -> bool:
        return self.bytes is not None


@dataclass
class MemoryPlan:
    setting: Setting
    components: list[Component]
    card: Card
    other: "MemoryPlan | None" = None  # the same recipe with gradient checkpointing the other way
    remedies: list[tuple[str, "MemoryPlan | None"]] = field(default_factory=list)  # None: advice, not a plan
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
                fast_path: bool | None = None, world_size: int = 1, engine: str | None = None) -> MemoryPlan:
    """The plan for a recipe. `counted` is params.count_for_recipe's result (its meta model is reused); the card
    defaults to the local GPU; checkpointing defaults to the recipe's setting, `auto` resolved by this plan;
    fast_path (liger-kernel on the training machine) defaults to whether liger can be imported here; world_size
    and engine (ddp or fsdp) plan one GPU of a distributed run."""
    from peftctl.methods.registry import METHODS
    from peftctl.params import count_for_recipe

    counted = counted or count_for_recipe(recipe)
    shape = model_shape(counted.model, counted.config, recipe)
    card = card or local_card()
    spec = METHODS[recipe.method.name]
    setting = recipe.training.gradient_checkpointing
    method = recipe.method.name

    def make(s: Setting) -> MemoryPlan:
        s = replace(s, world_size=world_size, engine=engine if world_size > 1 else None)
        return MemoryPlan(s, estimate(shape, s, method), card)

    off = make(setting_for(recipe, shape, False, fast_path=fast_path))
    on = make(setting_for(recipe, shape, True, fast_path=fast_path)) if spec.can_checkpoint else None
    if checkpointing is None:
        checkpointing = setting if isinstance(setting, bool) else (on is not None and off.fits is False)
    chosen, other = (on, off) if checkpointing and on is not None else (off, on)
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
    if s.attention == "sdpa" and s.attention_mask:
        chosen.notes.append("assumed: SDPA gets a mask (packed or padded rows); rows of one whole example need "
                            "less")
    if shape.experts[0]:
        chosen.notes.append(f"mixture of experts: all {shape.experts[0]} experts of each layer are resident (in the "
                            f"base weights); activations follow the {shape.experts[1]} routed per token")
    if chosen.fits is False:
        chosen.remedies = remedies(shape, chosen.setting, card, method, spec, recipe)
    return chosen


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


# --- the card ------------------------------------------------------------------------------------------------

_UNITS = {"": GiB, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "kb": 1000, "mb": 1000 ** 2,
          "gb": 1000 ** 3, "tb": 1000 ** 4, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}


def parse_gpu_memory(text: str) -> int:
    """'24GiB', '24 GB' (10^9), '80G' (GiB), '81559MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InvalidInput(f"--gpu-memory {text}: expected a size such as 24GiB, 80GB or 81559MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def card_from_option(text: str | None) -> Card:
    if text is not None:
        return Card(parse_gpu_memory(text), f"--gpu-memory {text.strip()}")
    return local_card()


def local_card(device=None) -> Card:
    import torch

    if not torch.cuda.is_available():
        return Card(None, "no GPU found here (give --gpu-memory, e.g. 24GiB)")
    device = device if device is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    return Card(int(props.total_memory), props.name)


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
    from peftctl.methods.registry import METHODS

    if not METHODS[recipe.method.name].can_checkpoint:
        return False
    plan = plan_memory(recipe, card=local_card(device), checkpointing=False)
    return plan.fits is False
