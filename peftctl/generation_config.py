"""generation_config.json for what a run writes (adapter/ and merged/): the stop tokens the fine-tune learned.

A chat fine-tune of a base model learns to end its turns with the template's end-of-turn token (`<|eot_id|>`,
`<|im_end|>`, `<end_of_turn>`), but the base's generation config lists only the base's EOS: transformers' generate
and vLLM would run every answer to the token limit. The config written here is the base's own (its sampling
defaults kept) with the end-of-turn token(s) added to the EOS ids, and the pad id of the tokenizer saved beside it,
so the tokenizer, config.json and generation_config.json agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FILE = "generation_config.json"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template writes right after an assistant reply ([] without a template).

    Found by rendering a reply and reading what follows it, so a template of the user's own is covered as well
    as the built-ins."""
    from peftctl.data.formats import _REPLY_MARK
    from peftctl.data.tokenize import special_ids

    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this shape has no end-of-turn we can read
        return []
    at = text.find(_REPLY_MARK)
    if at < 0:
        return []
    after = tokenizer(text[at + len(_REPLY_MARK):], add_special_tokens=False)["input_ids"]
    specials = special_ids(tokenizer)
    return [next(i for i in after if i in specials)] if any(i in specials for i in after) else []


def stop_ids(base_eos, tokenizer) -> list[int]:
    """The base's EOS id(s), the tokenizer's EOS and the template's end-of-turn, in that order, once each."""
    ids = [base_eos] if isinstance(base_eos, int) else list(base_eos or [])
    ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(ids))


def for_adapter(model, tokenizer):
    """The base model's generation config with the stop ids and pad id of the tokenizer the adapter was trained
    with."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(own.to_dict()) if own is not None else GenerationConfig()
    config.eos_token_id = stop_ids(config.eos_token_id, tokenizer)
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def save_for_adapter(model, tokenizer, folder: Path) -> None:
    for_adapter(model, tokenizer).save_pretrained(str(folder))


def load_saved(folder: Path):
    """The generation config saved with an adapter, or None (an adapter from before it was written)."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(folder)) if (Path(folder) / FILE).exists() else None


def write_into_merged(out: Path, adapter_dir: Path) -> None:
    """merged/ takes the adapter's generation config over the base's, and config.json the pad id it names."""
    source = Path(adapter_dir) / FILE
    if not source.exists():
        return
    shutil.copyfile(source, Path(out) / FILE)
    pad = json.loads(source.read_text()).get("pad_token_id")
    config_path = Path(out) / "config.json"
    if pad is not None and config_path.exists():
        config = json.loads(config_path.read_text())
        if config.get("pad_token_id") != pad:
            config["pad_token_id"] = pad
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def for_decoding(model, tokenizer, max_new_tokens: int, temperature: float):
    """A fresh generation config: greedy (or plain temperature sampling), stopping at any end token the model's own
    config or the tokenizer knows (Llama 3 ends a turn with <|eot_id|>, which is not its EOS)."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    stops = stop_ids(getattr(own, "eos_token_id", None), tokenizer)  # an adapter saved before its own config
    sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None} if temperature > 0 \
        else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops or None, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
                            **sampling)
