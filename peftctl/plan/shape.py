"""The model's shape for the memory plan, from the meta model with its adapter attached."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peftctl import fast_path
from peftctl.model import base_model
from peftctl.params import is_tuner_layer
from peftctl.plan.constants import (
    ACT_FN_SAVED,
    ATTENTION_INPUT_NAMES,
    ATTENTION_OUTPUT_NAMES,
    GATED_MLP_SAVED,
    MLP_INPUT_NAMES,
)


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
    linear_base: bool = False  # its base is a frozen linear layer of the model (not a 3-D expert tensor, not the head)


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
    input_embedding: int = 0  # elements of the input embedding's table
    input_embedding_blocker: str | None = None  # why it cannot live in host memory (train/host_embedding.py)
    adapted: list[Adapted] = field(default_factory=list)
    trainable: int = 0
    bottleneck: tuple[int, int] = (0, 0)  # (blocks, width) of our bottleneck adapter
    virtual_tokens: int = 0  # prompt/p-tuning: extra positions in every activation; prefix: extra keys/values
    prefix: bool = False
    experts: tuple[int, int] = (0, 0)  # MoE: (experts per layer, routed per token); all resident, top-k active
    # why packed rows cannot use a document kernel (varlen, flex) with this model (fast_path.document_kernel_refusal)
    document_kernel_refusal: str | None = "not checked"
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
    from peftctl import host_embedding

    text = getattr(config, "get_text_config", lambda: config)()
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(text, "num_key_value_heads", "n_kv_heads", default=heads) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    intermediate = _first(text, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    vocab = _first(text, "vocab_size")
    quant = recipe.quantization

    base = base_model(model)
    output_embeddings = base.get_output_embeddings()
    input_embeddings = base.get_input_embeddings()
    embedding_ids = {id(p) for m in (input_embeddings, output_embeddings) if m is not None for p in m.parameters()}
    linear_weights, linear_ids, linear_inputs, adapted, adapted_bases = [], set(), {}, [], []
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
            adapted_bases.append((info, getattr(module, "base_layer", None)))
    for info, base_layer in adapted_bases:  # the base layers come after their tuner layers in named_modules
        info.linear_base = id(getattr(base_layer, "weight", None)) in linear_ids
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
        input_embedding=input_embeddings.weight.numel() if hasattr(input_embeddings, "weight") else 0,
        input_embedding_blocker=host_embedding.why_not(model),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), bottleneck=bottleneck,
        virtual_tokens=getattr(method, "num_virtual_tokens", 0) or 0, prefix=method.name == "prefix_tuning",
        document_kernel_refusal=fast_path.document_kernel_refusal(getattr(config, "model_type", None), text,
                                                                  recipe.dataset.max_length),
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
