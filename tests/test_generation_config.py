"""generation_config.json in adapter/ and merged/: a chat fine-tune stops at the template's end-of-turn token in
plain transformers' generate, and `peftctl generate` stops there too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from peftctl.cli import generate as command

CHAT = [{"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
        for word in ("ok", "yes", "no", "fine", "blue", "green", "red", "sure")]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """A Llama-3-like *base*: its generation config stops only at <|end_of_text|>, as Meta-Llama-3-8B's does."""
    out = tmp_path_factory.mktemp("base") / "llama3-base"
    shutil.copytree(tiny_model("llama"), out)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = json.loads((out / "config.json").read_text())["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def chat_run(base, trained, tmp_path_factory):
    data = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHAT))
    return trained("chat", base, dataset={"path": str(data), "format": "chat"}, output={"merge": True})


def ids_of(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer, tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")


def always_says(model, token_id: int) -> None:
    """Make the model's head predict `token_id` whatever the input: what a chat fine-tune does at a turn's end."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[token_id] = 10.0
    model.set_output_embeddings(biased)


def new_tokens(model, tokenizer, generation_config) -> int:
    ids = tokenizer("Say ok.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config,
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    return out.shape[1] - ids.shape[1]


def test_adapter_and_merged_folders_list_the_end_of_turn_token_among_the_stops(chat_run, base):
    tokenizer, eot, eos = ids_of(chat_run / "adapter")
    for folder in (chat_run / "adapter", chat_run / "merged"):
        config = json.loads((folder / "generation_config.json").read_text())
        assert eot in config["eos_token_id"] and eos in config["eos_token_id"], folder
        assert config["pad_token_id"] == tokenizer.pad_token_id
    # The merged config.json names the pad id of the tokenizer saved beside it (the base's says null).
    assert json.loads((base / "config.json").read_text()).get("pad_token_id") is None
    assert json.loads((chat_run / "merged" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id


def test_plain_transformers_generate_stops_at_the_end_of_turn(chat_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer, eot, _ = ids_of(chat_run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(str(chat_run / "merged"), dtype=torch.float32)
    always_says(merged, eot)
    assert new_tokens(merged, tokenizer, merged.generation_config) == 1  # merged/'s own config
    assert new_tokens(merged, tokenizer, GenerationConfig.from_pretrained(str(base))) == NEW_TOKENS  # the base's

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                        str(chat_run / "adapter"))
    always_says(adapted.get_base_model(), eot)
    assert new_tokens(adapted, tokenizer, GenerationConfig.from_pretrained(str(chat_run / "adapter"))) == 1


@pytest.mark.parametrize("where", ["adapter", "merged", "adapter-without-config"])
def test_peftctl_generate_stops_at_the_end_of_turn(chat_run, tmp_path, where):
    folder = chat_run / where.split("-")[0]
    if where == "adapter-without-config":  # an adapter written before the config was: the template says it
        folder = shutil.copytree(folder, tmp_path / "adapter")
        (folder / "generation_config.json").unlink()
    model, tokenizer = command.load_for_generation(str(folder))
    _, eot, eos = ids_of(chat_run / "adapter")
    config = command.generation_config(model, tokenizer, NEW_TOKENS, 0.0)
    assert eot in config.eos_token_id and eos in config.eos_token_id
    always_says(model.get_base_model() if hasattr(model, "get_base_model") else model, eot)
    answer = command.generate_one(model, tokenizer, "Say ok.", chat=True, config=config)
    assert answer == ""  # stopped at once; <|eot_id|> itself is not shown
