"""Tiny random models of every family in the support matrix (README's table), as ordinary model folders.

Each is built from transformers' own config class for the family with small sizes, and carries a locally trained
tokenizer of the nearest family in make_tiny_model.py (Llama 3's, ChatML's, Gemma's, Mistral's). Sliding windows
are made shorter than the test sequences, so that a model that ignores per-example positions inside a sliding
window shows it.

    python scripts/tiny_families.py --out /tmp/fam            # /tmp/fam/<family> for each
    python scripts/tiny_families.py --family mixtral --out /tmp/fam

Importable (tests put scripts/ on sys.path): FAMILIES, MOE_FAMILIES, family_config(), make_family_model().
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from make_tiny_model import (
    DEFAULT_INIT_STD,
    FAMILIES as TOKENIZER_FAMILIES,
    _save_tokenizer,
    _token_ids,
    make_tokenizer,
)

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, POSITIONS = 64, 2, 4, 2, 16, 128, 512
WINDOW = 16  # sliding windows shorter than a packed row of the tests
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (tokenizer family, config keys beyond the common ones)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen2", {}),
    "gemma2": ("gemma", {"sliding_window": WINDOW, "query_pre_attn_scalar": HEAD_DIM}),
    "gemma3_text": ("gemma", {"sliding_window": WINDOW, "query_pre_attn_scalar": HEAD_DIM,
                              "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {"head_dim": None}),
    "olmo2": ("llama", {}),
    "cohere": ("llama", {}),
    "granite": ("llama", {}),
    "starcoder2": ("llama", {"sliding_window": WINDOW}),
    "glm4": ("llama", {}),
    "smollm3": ("llama", {}),
    "falcon": ("llama", {"head_dim": None, "num_kv_heads": KV_HEADS, "new_decoder_architecture": True,
                         "parallel_attn": True, "bias": False, "alibi": False}),
    "gpt_neox": ("llama", {"rotary_pct": 0.5, "use_parallel_residual": True}),
    "gpt_oss": ("llama", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                          "layer_types": ["sliding_attention", "full_attention"]}),
    "mixtral": ("mistral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": ("qwen2", {"num_experts": 4, **MOE}),
    "deepseek_v3": ("llama", {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                              "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                              "v_head_dim": 16, "head_dim": None, "num_key_value_heads": HEADS,
                              "n_group": 1, "topk_group": 1, "rope_parameters": None, **MOE}),
    "qwen3_next": ("qwen2", {"num_experts": 4, **MOE, "shared_expert_intermediate_size": 32,
                             "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                             "linear_value_head_dim": 16, "layer_types": ["linear_attention", "full_attention"]}),
}
MOE_FAMILIES = ("gpt_oss", "mixtral", "qwen3_moe", "deepseek_v3", "qwen3_next")


def family_config(family: str, vocab_size: int, token_ids: dict | None = None, *, init_std: float = DEFAULT_INIT_STD,
                  **overrides):
    """transformers' config for a tiny `family` model; `overrides` change any key (sizes of a bigger model)."""
    from transformers import AutoConfig

    _, extra = FAMILIES[family]
    keys = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
                max_position_embeddings=POSITIONS, initializer_range=init_std, tie_word_embeddings=False)
    keys.update({k: v for k, v in extra.items()})
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if v is not None}
    if family == "falcon":
        keys["num_kv_heads"] = keys.pop("num_key_value_heads")
    return AutoConfig.for_model(family, **keys, **(token_ids or {}))


def make_family_model(family: str, out: str | Path, *, seed: int = 0, corpus=None, tokenizer=None,
                      dtype: str = "float32", **overrides) -> Path:
    """Write a tiny `family` model folder (float32 random weights, tokenizer, generation config) at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer_family = TOKENIZER_FAMILIES[FAMILIES[family][0]]
    tokenizer = tokenizer or make_tokenizer(FAMILIES[family][0], corpus, max_positions=POSITIONS)
    vocab_size = math.ceil(len(tokenizer) / 64) * 64
    token_ids = _token_ids(tokenizer, tokenizer_family)
    config = family_config(family, vocab_size, token_ids, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen_init(model, config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_token_id"], pad_token_id=token_ids["pad_token_id"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in tokenizer_family.generation_eos])
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _save_tokenizer(tokenizer, tokenizer_family, out)
    return out


def _widen_init(model, std: float) -> None:
    """Some families initialise at a fixed small std whatever initializer_range says, and fused expert tensors are
    not Linear layers: draw every matrix from N(0, std) so a tiny model passes signal to its adapter."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="all", choices=[*FAMILIES, "all"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for family in FAMILIES if args.family == "all" else (args.family,):
        print(make_family_model(family, args.out / family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
