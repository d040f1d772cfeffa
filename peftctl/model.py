"""The base model and its tokenizer: loading (local folder or hub), quantisation, and tokenizer hygiene.

Setup order matters here: quantisation happens while loading; the k-bit preparation (freezing, optional upcasts,
gradient checkpointing) must run before the adapter is attached, because peft's own preparation freezes every
parameter, adapters included.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftctl.errors import InvalidInput, ModelNotFound, first_line, hub_failure

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}[name]


def from_pretrained(loader, name: str, what: str, **kwargs):
    """Call a transformers loader and turn "not there" into one message that says what was tried."""
    local = os.path.isabs(name)
    if local:
        if not Path(name).is_dir():
            raise ModelNotFound(f"{what} {name}: no such folder")
        if what == "model" and not (Path(name) / "config.json").exists():
            raise ModelNotFound(f"{name}: not a model folder (no config.json)",
                                hint="point model.name at the folder that holds config.json and the weights")
    try:
        return loader(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - classified below; the rest goes up unchanged
        from peftctl.remote_code import is_refusal, refusal

        if is_refusal(e):
            raise refusal(name) from None
        kind, text = hub_failure(e), first_line(e)
        if kind == "gated":
            raise ModelNotFound(f"{name} is gated: {text}", hint="accept its licence on the hub, then "
                                "`hf auth login`") from e
        if kind in ("missing", "not_cached", "missing_file") or (isinstance(e, OSError) and not local):
            tried = f"the local folder {name}" if local else (
                f"a folder named {name!r} (none), the hub cache (HF_HOME), and the hub"
                + (" (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""))
            raise ModelNotFound(f"{what} {name} not found; tried {tried}: {text}",
                                hint="check model.name (a hub id, or a folder relative to the recipe); for a "
                                "private or gated model run `hf auth login`; offline, fetch it first") from e
        raise


def load_tokenizer(model_section, *, base_dir: Path | None = None):
    from transformers import AutoTokenizer

    from peftctl.data.templates import resolve_template

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_section.name, "tokenizer of",
                                 revision=model_section.revision, trust_remote_code=model_section.trust_remote_code)
    if model_section.chat_template:
        try:
            tokenizer.chat_template = resolve_template(model_section.chat_template, base_dir)
        except FileNotFoundError as e:
            raise InvalidInput(f"model.chat_template: {e}") from None
    if tokenizer.eos_token_id is None:
        raise InvalidInput(f"the tokenizer of {model_section.name} has no EOS token",
                           hint="a causal LM tokenizer needs one to end examples; choose another tokenizer")
    choose_pad(tokenizer)
    return tokenizer


def choose_pad(tokenizer) -> int:
    """A pad token that is not EOS, taken from the existing vocabulary (never resize the embeddings: the adapter
    would no longer load onto the stock base). Where there is none, pad with EOS: labels come from lengths and
    spans, so every real EOS is still trained."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] != eos and vocab[token] != tokenizer.bos_token_id:
            tokenizer.pad_token = token
            return vocab[token]
    tokenizer.pad_token = tokenizer.eos_token
    return eos


def quantization_config(quant):
    """bitsandbytes settings for the recipe's quantization section (None: no quantisation)."""
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype))


def load_model(recipe, device, *, gradient_checkpointing: bool = False, reentrant: bool = False):
    """The frozen base model on `device`, quantised as the recipe says, ready for an adapter. `reentrant`: the
    checkpointed layers recompute through torch's reentrant checkpoint where a call allows it (one process only:
    peftctl/activation_checkpointing.py)."""
    from transformers import AutoModelForCausalLM

    section = recipe.model
    kwargs = dict(revision=section.revision, trust_remote_code=section.trust_remote_code,
                  dtype=torch_dtype(section.dtype), device_map={"": str(device)})
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    qconfig = quantization_config(recipe.quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, section.name, "model", **kwargs)
    prepare_frozen_base(model, recipe.quantization, device, gradient_checkpointing=gradient_checkpointing,
                        reentrant=reentrant)
    return model


def prepare_frozen_base(model, quant, device, *, gradient_checkpointing: bool, reentrant: bool = False) -> None:
    """Our k-bit preparation: peft's upcasts embeddings, lm_head and norms to float32 (~2 GiB on 8B); we upcast
    only when asked."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if quant is not None and quant.upcast_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to(torch.float32)
    if quant is not None and device.type == "cpu":
        disable_cpu_repacking(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, reentrant=reentrant)


def enable_gradient_checkpointing(model, *, reentrant: bool = False) -> str:
    """Checkpoint the decoder layers (peftctl/activation_checkpointing.py); returns the form taken."""
    from peftctl import activation_checkpointing

    return activation_checkpointing.enable(model, reentrant=reentrant)


def disable_cpu_repacking(model) -> None:
    """bitsandbytes on a CPU with AVX512-BF16 repacks 4-bit weights at the first eval-mode forward, after which
    dequantisation (merges, DoRA) reads garbage. Keep the plain layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model, count: int | None = None):
    """The model's list of decoder layers: the ModuleList as long as config.num_hidden_layers (or `count`)."""
    from torch import nn

    n_layers = count or getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError("cannot find the decoder layers of this model")


def linear_layer_names(model) -> list[str]:
    """The distinct last-name parts of the model's linear layers (what `targets` can name)."""
    names = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if name and (cls in ("Linear", "Conv1D") or cls.startswith("Linear")) and "lora" not in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


# How far above the run's own noise floor a difference must stand to count as a leak: bf16 noise between two
# layouts varies from pass to pass, a leak is of the order of the contamination itself.
NOISE_MARGIN = 4.0


def check_packing_isolation(model, device, vocab_size: int) -> tuple[bool, float, float]:
    """Whether this model's attention keeps packed examples apart when given restarting position_ids.

    Two short documents are packed in one row; the second one's logits must match those it gets alone. The
    difference is judged against the contamination we get when isolation is forced off (a full attention mask),
    so the test is scale-free and works for random weights as well as trained ones.

    Low precision makes the packed and the alone pass differ a little anyway, and a mixture-of-experts router
    turns that into a large difference at a few tokens (a near-tied top-k choice flips, and that token's hidden
    state changes). A leak, by contrast, reaches every position of the second document. So each statistic is
    the median over positions of the largest logit difference there, and the difference must stand above both
    5% of the contamination and the noise floor of this same run: the document computed at the start of a row of
    the same length, which causality alone keeps isolated whatever the attention does with position_ids.
    Returns (isolated, difference, contamination). A model whose attention is our varlen kernel gets the
    documents' lengths as training batches carry them; one that drops them on the way leaks, and fails here.
    """
    import torch

    from peftctl.data.packing import cumulative_lengths, document_kwargs
    from peftctl.packed_attention import uses_documents

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, max(4, vocab_size - 1), (1, n), generator=gen) for n in (12, 9, 12))

    def row(first, second):
        ids = torch.cat([first, second], dim=1).to(device)
        positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])]).unsqueeze(0)
        return ids, positions.to(device)

    def documents(*parts) -> dict:  # the documents' lengths, as collate gives them, for a varlen kernel
        if not uses_documents(model):
            return {}
        lengths = [p.shape[1] for p in parts]
        return document_kwargs(cumulative_lengths(lengths).to(device), max(lengths))

    packed, positions = row(a, b)
    b_first, b_first_positions = row(b, c)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b.to(device), use_cache=False).logits.float()
            isolated = model(input_ids=packed, position_ids=positions, use_cache=False,
                             **documents(a, b)).logits[:, a.shape[1]:]
            mixed = model(input_ids=packed, position_ids=positions, use_cache=False,
                          attention_mask=torch.ones_like(packed)).logits[:, a.shape[1]:]
            first = model(input_ids=b_first, position_ids=b_first_positions, use_cache=False,
                          **documents(b, c)).logits[:, :b.shape[1]]
    finally:
        model.train(was_training)

    def spread(logits) -> float:  # median over positions of the largest logit difference from `alone`
        return (logits.float() - alone).abs().amax(dim=-1).median().item()

    difference, contamination, noise = spread(isolated), spread(mixed), spread(first)
    bound = max(0.05 * contamination, NOISE_MARGIN * noise) + 1e-6 * (1 + alone.abs().max().item())
    return difference <= bound and not carries_state_along_the_row(model), difference, contamination


# Layer kinds (config.layer_types) whose state runs along the whole row: linear attention (Qwen3-Next's gated
# delta rule and its short convolution), Mamba, convolution blocks. Restarting position_ids do not reset that
# state (transformers resets it only from flash-attention's cu_seqlens, which packed rows here do not carry),
# so the first tokens of a packed example read the previous one. With random weights the state forgets fast
# and the leak can fall under the probe's 5% bound, so it is judged from the layer kinds.
RECURRENT_LAYER_KINDS = ("linear", "mamba", "conv", "recurrent", "ssm")


def carries_state_along_the_row(model) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None) or []
    return any(part in str(kind) for kind in kinds for part in RECURRENT_LAYER_KINDS)

