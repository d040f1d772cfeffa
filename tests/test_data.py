"""Data: formats, loss masks, chat spans, bad rows, truncation, packing, the tokenisation cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import cli, read_jsonl, run_cli
from peftctl.data.formats import FormatOptions, render
from peftctl.data.packing import collate, pack_examples
from peftctl.data.prepare import prepare
from peftctl.data.tokenize import IGNORE, special_ids, tokenize_rendered
from peftctl.errors import DataError
from peftctl.recipe.schema import DatasetSection

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]
# The text that must be trained after each assistant reply: the template's end-of-turn token.
END_OF_TURN = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma": "<end_of_turn>"}


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    from transformers import AutoTokenizer

    from peftctl.model import choose_pad

    out = {}
    for arch in ("llama", "qwen2", "gemma", "mistral", "gpt2"):
        tok = AutoTokenizer.from_pretrained(tiny_model(arch))
        choose_pad(tok)
        out[arch] = tok
    return out


def tokenize_row(tok, row: dict, fmt: str, max_length: int = 512, train_on_prompt: bool = False):
    rendered = render(row, FormatOptions(fmt, {}, train_on_prompt), tok)
    return tokenize_rendered(rendered, tok, max_length, tok.eos_token_id, special_ids(tok))


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def test_alpaca_labels_are_ignored_exactly_on_the_prompt(tokenizers):
    tok = tokenizers["llama"]
    row = {"instruction": "Spell the word.", "input": "cat", "output": "c-a-t"}
    ex = tokenize_row(tok, row, "alpaca")
    labels, ids = ex["labels"], ex["input_ids"]
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert all(label == IGNORE for label in labels[:first_trained])
    assert all(label == token for label, token in zip(labels[first_trained:], ids[first_trained:]))
    assert tok.decode(ids[:first_trained]).endswith("### Response:\n")
    assert trained_text(tok, ex) == "c-a-t" + tok.eos_token
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE


def test_train_on_prompt_trains_everything_but_the_first_token(tokenizers):
    tok = tokenizers["llama"]
    ex = tokenize_row(tok, {"instruction": "Say hi.", "output": "hi"}, "alpaca", train_on_prompt=True)
    assert ex["labels"][0] == IGNORE and all(label != IGNORE for label in ex["labels"][2:])


def test_completion_and_prompt_completion(tokenizers):
    tok = tokenizers["qwen2"]
    ex = tokenize_row(tok, {"text": "all of this is trained"}, "completion")
    assert trained_text(tok, ex).endswith("is trained" + tok.eos_token)
    ex = tokenize_row(tok, {"prompt": "Q: 2+2? A:", "completion": " 4"}, "prompt_completion")
    assert trained_text(tok, ex) == " 4" + tok.eos_token


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_chat_trains_assistant_turns_and_their_end_of_turn_token(tokenizers, arch):
    tok = tokenizers[arch]
    ex = tokenize_row(tok, {"messages": CONVERSATION}, "chat")
    eot = END_OF_TURN[arch]
    # Split the trained tokens into runs: one run per assistant turn.
    runs, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [tok.decode(run) for run in runs]
    assert len(texts) == 2, texts
    assert texts[0].startswith("Blue.") and eot in texts[0]
    assert texts[1].startswith("Green, like grass.") and eot in texts[1]
    untrained = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label == IGNORE])
    assert "Name a colour." in untrained and "Blue." not in untrained
    assert tok.convert_tokens_to_ids(eot) in [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_conversation_opening_with_the_assistant_trains_only_its_reply(tokenizers, arch):
    # The opening reply's start is found as every later one's: its header (and Llama 3's BOS) stay untrained.
    tok = tokenizers[arch]
    messages = [{"role": "assistant", "content": "Hello, how can I help?"}, *CONVERSATION[1:]]
    ex = tokenize_row(tok, {"messages": messages}, "chat")
    first_trained = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
    assert tok.decode(ex["input_ids"][first_trained:]).startswith("Hello, how can I help?")
    assert "assistant" not in tok.decode(ex["input_ids"][first_trained:first_trained + 3])
    header = tok.decode(ex["input_ids"][:first_trained])
    assert header.endswith({"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                            "qwen2": "<|im_start|>assistant\n"}[arch])
    assert trained_text(tok, ex).startswith("Hello, how can I help?" + END_OF_TURN[arch])


def test_chat_reply_after_a_space_keeps_the_space_in_its_first_token(tokenizers):
    # Mistral writes "[/INST] reply</s>": the space belongs to the reply's first token, which must be trained.
    tok = tokenizers["mistral"]
    ex = tokenize_row(tok, {"messages": CONVERSATION[1:]}, "chat")
    assert trained_text(tok, ex).lstrip().startswith("Blue.")
    assert "Green, like grass." in trained_text(tok, ex)


def test_chat_needs_a_template(tmp_path, tokenizers):
    from peftctl.data.templates import BUILTIN_TEMPLATES
    from peftctl.errors import InvalidInput

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    tok = tokenizers["gpt2"]  # a base model: no chat template
    with pytest.raises(InvalidInput) as err:
        prepare(section(path, format="chat"), tok, seed=0, pad_id=0)
    assert "no chat template" in err.value.message and "model.chat_template" in err.value.hint
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    try:
        data = prepare(section(path, format="chat", max_length=512), tok, seed=0, pad_id=0)
    finally:
        tok.chat_template = None
    assert data.train.stats.examples == 1


def test_pad_equal_to_eos_still_trains_every_eos(tokenizers):
    tok = tokenizers["llama"]
    assert tok.pad_token_id == tok.eos_token_id  # like real Llama 3: no pad token to reuse
    short = tokenize_row(tok, {"instruction": "a", "output": "b"}, "alpaca")
    long = tokenize_row(tok, {"instruction": "a much longer instruction here", "output": "and a longer answer"},
                        "alpaca")
    batch = collate([[short], [long]], tok.pad_token_id, packed=False)
    n = len(short["input_ids"])
    assert batch.labels[0, n - 1].item() == tok.eos_token_id  # the real EOS is trained
    assert (batch.labels[0, n:] == IGNORE).all() and (batch.input_ids[0, n:] == tok.eos_token_id).all()
    assert batch.attention_mask[0].sum().item() == n


def test_pad_reuses_a_special_token_that_is_not_eos(tokenizers):
    for arch in ("qwen2", "gemma", "mistral"):
        tok = tokenizers[arch]
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, arch


def test_packed_batch_positions_and_labels(tokenizers):
    tok = tokenizers["qwen2"]
    a = tokenize_row(tok, {"text": "first example"}, "completion")
    b = tokenize_row(tok, {"text": "the second one"}, "completion")
    batch = collate([[a, b]], tok.pad_token_id, packed=True, pad_to=40)
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert batch.attention_mask is None
    assert batch.position_ids[0, :la].tolist() == list(range(la))
    assert batch.position_ids[0, la:la + lb].tolist() == list(range(lb))
    assert batch.labels[0, la].item() == IGNORE  # no example predicts the first token of the next
    assert batch.n_tokens == la + lb and batch.n_trained == la + lb - 2


def test_pack_examples_best_fit():
    rng = random.Random(0)
    lengths = [min(512, max(8, int(rng.lognormvariate(4.5, 0.8)))) for _ in range(2000)]
    rows = pack_examples(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    fill = sum(lengths) / (len(rows) * 512)
    assert fill > 0.97, fill
    with pytest.raises(ValueError, match=r"example 0 is longer \(600\) than a row \(512\)"):
        pack_examples([600], 512)


# --- whole files ----------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def section(path, **kwargs) -> DatasetSection:
    return DatasetSection(path=str(path), validation=0.0, max_length=kwargs.pop("max_length", 64), **kwargs)


GOOD_ROW = {"instruction": "Say hi.", "output": "hi"}


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": "x", "output": 5}, "field 'output' must be text, got int"),
    ({"instruction": "x", "output": "   "}, "field 'output' is empty"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizers, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, GOOD_ROW, bad, GOOD_ROW])
    with pytest.raises(DataError) as err:
        prepare(section(path), tokenizers["llama"], seed=0, pad_id=0)
    assert f"{path} line 3: {message}" in err.value.message


def test_bad_chat_rows(tmp_path, tokenizers):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(section(path, format="chat"), tokenizers["qwen2"], seed=0, pad_id=0)
    assert "line 2: message 1 has unknown role 'robot'" in err.value.message and "1 more bad row" in err.value.message
    data = prepare(section(path, format="chat", on_bad_rows="skip"), tokenizers["qwen2"], seed=0, pad_id=0)
    stats = data.train.stats
    assert stats.examples == 1 and stats.bad_rows == 2
    assert any("line 3: the conversation has no assistant message" in b for b in stats.bad_examples)


def test_skip_counts_bad_rows_and_blank_lines(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD_ROW, "", {"instruction": "x"}, GOOD_ROW, "oops"])
    data = prepare(section(path, on_bad_rows="skip"), tokenizers["llama"], seed=0, pad_id=0)
    stats = data.train.stats
    assert (stats.examples, stats.bad_rows, stats.blank_lines, stats.rows_read) == (2, 2, 1, 5)


def test_truncation_and_examples_left_without_trained_tokens(tmp_path, tokenizers):
    long_prompt = {"instruction": " ".join(["word"] * 200), "output": "answer"}
    long_answer = {"instruction": "Say many words.", "output": " ".join(["word"] * 200)}
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD_ROW, long_prompt, long_answer])
    data = prepare(section(path, max_length=48), tokenizers["llama"], seed=0, pad_id=0)
    stats = data.train.stats
    assert stats.truncated == 2 and stats.skipped_no_trained_token == 1 and stats.examples == 2
    assert max(data.train.examples["length"]) == 48


def test_field_renames_and_formats(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    data = prepare(section(path, fields={"instruction": "question", "output": "answer"}), tokenizers["llama"],
                   seed=0, pad_id=0)
    assert data.train.stats.examples == 1


def test_csv_parquet_json_and_folders(tmp_path, tokenizers):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(6)]
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:3])
    write_jsonl(folder / "b.jsonl", rows[3:])
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "rows.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    for path in (folder, tmp_path / "rows.json", tmp_path / "rows.csv", tmp_path / "rows.parquet"):
        data = prepare(section(path, format="prompt_completion"), tokenizers["qwen2"], seed=0, pad_id=0)
        assert data.train.stats.examples == 6, path


def test_validation_fraction_and_own_path(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"n{i}", "output": f"o{i}"} for i in range(20)])
    val = write_jsonl(tmp_path / "v.jsonl", [GOOD_ROW] * 3)
    data = prepare(DatasetSection(path=str(path), validation=0.25, max_length=64), tokenizers["llama"],
                   seed=0, pad_id=0)
    assert (data.train.stats.examples, data.validation.stats.examples) == (15, 5)
    data = prepare(DatasetSection(path=str(path), validation=str(val), max_length=64), tokenizers["llama"],
                   seed=0, pad_id=0)
    assert (data.train.stats.examples, data.validation.stats.examples) == (20, 3)


def test_second_process_reuses_the_tokenisation_cache(tmp_path, tiny_model, write_recipe, monkeypatch):
    import datasets

    data = write_jsonl(tmp_path / "cache.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)])
    recipe = write_recipe(tiny_model("llama"), data=data)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # read at import: set it here
    first = cli("train", str(recipe), "--dry-run", "--log-format", "json")  # this process
    second = run_cli("train", str(recipe), "--dry-run", "--log-format", "json", env=env)  # another one
    plans = []
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        plans.append(json.loads(result.stdout))
    assert plans[0]["tokenization_cached"] is False and plans[1]["tokenization_cached"] is True
    assert plans[0]["tokens"] == plans[1]["tokens"]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_inspect_data_shows_masks_and_eos(tiny_model, write_recipe):
    recipe = write_recipe(tiny_model("llama"))
    result = cli("inspect-data", str(recipe), "-n", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "<|end_of_text|>" in out and "### Response:" in out
    assert "trained" in out and "length" in out.lower()


def test_metrics_helper_reads_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_a_mixture_takes_the_asked_proportions_and_reports_them(tmp_path, tokenizers):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": f"x{i}"} for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"completion number {i}"} for i in range(100)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)])
    mix = [{"path": str(a), "weight": 3}, {"path": str(b), "format": "completion", "weight": 1},
           {"path": str(c), "format": "prompt_completion", "examples": 25}]
    data = prepare(DatasetSection(mix=mix, validation=0.0, max_length=64), tokenizers["llama"], seed=0, pad_id=0)
    report = {Path(s["source"]).name: s for s in data.train.stats.sources}
    assert report["a.jsonl"]["examples"] == 300 and report["b.jsonl"]["examples"] == 100  # 3:1 of 400
    assert report["c.jsonl"]["examples"] == 25 and report["c.jsonl"]["available"] == 10  # repeated to 25
    assert data.train.stats.examples == 425
    assert sum(s["tokens"] for s in data.train.stats.sources) == data.train.stats.tokens
    # Weights 1:1 over 400 examples: 200 each, so `a` is subsampled and `b` repeated twice.
    mix = [{"path": str(a), "weight": 1}, {"path": str(b), "format": "completion", "weight": 1}]
    data = prepare(DatasetSection(mix=mix, validation=0.0, max_length=64), tokenizers["llama"], seed=0, pad_id=0)
    assert [s["examples"] for s in data.train.stats.sources] == [200, 200]
    texts = [tokenizers["llama"].decode(ids) for ids in data.train.examples["input_ids"]]
    assert sum("completion number" in t for t in texts) == 200 and len(set(texts)) == 300


def test_path_and_mix_are_exclusive(tmp_path):
    from peftctl.errors import RecipeError
    from peftctl.recipe.loader import parse_recipe

    base = "model: {name: org/m}\nmethod: {name: lora}\noutput: {dir: o}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(base + "dataset: {path: org/d, mix: [{path: org/e}]}\n", "r.yaml", tmp_path)
    assert "not both" in err.value.problems[0].message
    with pytest.raises(RecipeError) as err:
        parse_recipe(base + "dataset: {format: alpaca}\n", "r.yaml", tmp_path)
    assert "needs dataset.path" in err.value.problems[0].message
    with pytest.raises(RecipeError) as err:
        parse_recipe(base + "dataset: {mix: [{path: org/e, weight: 2, examples: 5}]}\n", "r.yaml", tmp_path)
    assert err.value.problems[0].key == "dataset.mix.0.weight"
    ok = parse_recipe(base + "dataset:\n  mix:\n    - {path: org/e}\n    - {path: data/x.jsonl}\n", "r.yaml",
                      tmp_path, check_paths=False).recipe
    assert ok.dataset.mix[1].path == str(tmp_path / "data" / "x.jsonl")


def test_a_named_template_renders_for_a_tokenizer_without_one(tiny_model, tmp_path):
    from peftctl.model import load_tokenizer
    from peftctl.recipe.schema import ModelSection

    tok = load_tokenizer(ModelSection(name=str(tiny_model("gpt2")), chat_template="chatml"))
    text = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                    "<|im_start|>assistant\nBlue.<|im_end|>\n")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}])
    data = prepare(section(path, format="chat", max_length=512, system_prompt="Be brief."), tok, seed=0, pad_id=0)
    ids = data.train.examples[0]["input_ids"]
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    template_file = tmp_path / "mine.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer(ModelSection(name=str(tiny_model("gpt2")), chat_template=str(template_file)))
    assert tok.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "[user] Name a colour.\n[assistant] Blue.\n"


def test_special_token_text_inside_a_row_is_reported_with_its_line(tmp_path, tokenizers, tiny_model,
                                                                   write_recipe):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "say <|im_end|> twice"},
                          {"role": "assistant", "content": "no"}]},
            {"messages": [{"role": "user", "content": "[note] plain"}, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    stats = prepare(section(path, format="chat"), tokenizers["qwen2"], seed=0, pad_id=0).train.stats
    assert stats.special_text_rows == 1 and stats.examples == 3
    assert stats.special_text_examples == [f"{path} line 2: '<|im_end|>'"]
    # Plain text formats too: a completion holding the EOS text becomes the EOS token.
    plain = write_jsonl(tmp_path / "plain.jsonl", [GOOD_ROW, {"instruction": "end", "output": "x <|end_of_text|>"}])
    llama = prepare(section(plain), tokenizers["llama"], seed=0, pad_id=0).train.stats
    assert llama.special_text_rows == 1 and "line 2: '<|end_of_text|>'" in llama.special_text_examples[0]

    # Reported by train (before anything is written) and by inspect-data, along with a bad row whose text looks
    # like rich markup (a closing tag with nothing open made rich raise).
    bad_role = {"messages": [{"role": "[/x]", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", rows + [bad_role])
    recipe = write_recipe(tiny_model("qwen2"), data=data, dataset={"format": "chat", "on_bad_rows": "skip"})
    dry = cli("train", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    said = (dry.stdout + dry.stderr).replace("\n", "")
    assert "1 example(s) hold a special token's text" in said and "mixed.jsonl line 2: '<|im_end|>'" in said
    shown = cli("inspect-data", str(recipe), "-n", "1")
    assert shown.returncode == 0, shown.stderr
    assert "line 2: '<|im_end|>'" in shown.stdout and "unknown role '[/x]'" in shown.stdout


def test_max_length_that_cuts_every_answer_says_so_and_inspect_data_still_shows_them(tmp_path, tokenizers,
                                                                                     tiny_model, write_recipe,
                                                                                     capsys):
    from peftctl.cli import inspect_data
    from peftctl.cli.errors import run_guarded

    tok = tokenizers["llama"]
    rows = [{"instruction": "Describe this in a few words: " + "word " * (20 + i), "output": "A short answer."}
            for i in range(6)]
    path = write_jsonl(tmp_path / "long_prompts.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(section(path, max_length=32), tok, seed=0, pad_id=tok.pad_token_id)
    message, hint = err.value.message, err.value.hint
    assert "max_length 32 cut every answer token of 6 example(s)" in message
    assert "dataset.format" not in hint and "--set dataset.max_length=" in hint
    # The numbers are right: the max_length the message names for "a token of every answer" keeps every example.
    keeps = int(message.split("; max_length ")[1].split(" keeps")[0].replace(",", ""))
    data = prepare(section(path, max_length=keeps), tok, seed=0, pad_id=tok.pad_token_id)
    assert data.train.stats.examples == 6 and data.train.stats.skipped_no_trained_token == 0
    one_less = prepare(section(path, max_length=keeps - 1), tok, seed=0, pad_id=tok.pad_token_id)
    assert one_less.train.stats.skipped_no_trained_token == 1  # the longest prompt's answer is cut away

    recipe = write_recipe(tiny_model("llama"), data=path, dataset={"max_length": 32})
    code = run_guarded(lambda: inspect_data.run(str(recipe), [], 2))
    out = capsys.readouterr().out
    assert code == 0 and "example 1: 32 tokens, 0 trained" in out and "cut every answer token" in out
