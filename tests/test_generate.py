"""`peftctl generate`: greedy continuations of an adapter on its base (any method, quantised as trained) or of a
merged model, one output line per prompt, prompts from stdin, and the chat template with --chat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from peftctl.cli import generate as command
from peftctl.cli.errors import run_guarded

PROMPTS = ["The cat", "What is 2 plus 2?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama", shards=3)




@pytest.fixture(scope="module")
def lora_run(base, trained):
    return trained("lora", base, training={"max_steps": 8, "learning_rate": 5e-3})


def expected(run: Path, prompts: list[str], chat: bool = False) -> list[str]:
    """Greedy continuations computed with stock transformers + peft, independently of peftctl's code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    base = json.loads((adapter / "peftctl_adapter.json").read_text())["base_model"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    answers = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"))
    return answers


def generate(source, prompt=None, *, stdin: str | None = None, chat=False, monkeypatch=None, capsys=None,
             prompt_format="raw", jsonl=False):
    """Run the command in-process: (exit code, stdout lines, stderr)."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = run_guarded(lambda: command.run(str(source), prompt, chat=chat, max_new_tokens=NEW_TOKENS,
                                           temperature=0.0, prompt_format=prompt_format, jsonl=jsonl))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_cli_continues_each_stdin_line_of_a_trained_adapter(lora_run):
    done = run_cli("generate", str(lora_run), "--max-new-tokens", str(NEW_TOKENS), "--format", "raw",
                   input=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 4  # one line per input line, the blank one blank
    first, blank, second = lines[:3]
    assert blank == "" and first and second
    assert [first, second] == expected(lora_run, PROMPTS)


def test_a_merged_folder_generates_what_its_adapter_generates(lora_run, tmp_path, monkeypatch, capsys):
    from peftctl.merge import merge_adapter

    merge_adapter(lora_run, tmp_path / "merged")
    code, lines, err = generate(tmp_path / "merged", PROMPTS[0], capsys=capsys)
    assert code == 0, err
    assert lines == expected(lora_run, PROMPTS[:1])
    code, lines, err = generate(lora_run / "adapter", stdin="\n".join(PROMPTS), monkeypatch=monkeypatch,
                                capsys=capsys)
    assert code == 0 and lines == expected(lora_run, PROMPTS)


def test_chat_wraps_the_prompt_in_the_template(lora_run, capsys):
    code, lines, err = generate(lora_run, PROMPTS[1], chat=True, capsys=capsys)
    assert code == 0, err
    assert lines == expected(lora_run, PROMPTS[1:], chat=True)
    assert len(lines) == 1  # a newline in the answer would be written as \n


def test_a_temperature_samples(lora_run, capsys):
    code = run_guarded(lambda: command.run(str(lora_run), PROMPTS[0], chat=False, max_new_tokens=NEW_TOKENS,
                                           temperature=0.8))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(captured.out.splitlines()) == 1


@pytest.mark.parametrize("name,sections", [
    ("qlora", {"method": {"name": "qlora"},
               "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}}),
    ("prefix", {"method": {"name": "prefix_tuning", "_replace": True, "num_virtual_tokens": 4},
                "dataset": {"packing": False}}),
    ("bottleneck", {"method": {"name": "adapter", "_replace": True}}),
])
def test_every_method_generates_on_its_base(name, sections, base, trained, capsys, monkeypatch):
    import bitsandbytes as bnb

    run = trained(name, base, **sections)
    model, _ = command.load_for_generation(str(run))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == (name == "qlora")
    del model
    code, lines, err = generate(run, PROMPTS[0], capsys=capsys)
    assert code == 0, err
    assert len(lines) == 1


def test_sources_that_cannot_generate_exit_2(tiny_model, tmp_path, capsys):
    code, _, err = generate(tmp_path / "nowhere", "hi", capsys=capsys)
    assert code == 2 and "no such folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = generate(tmp_path / "empty", "hi", capsys=capsys)
    assert code == 2 and "neither a run folder" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    code, _, err = generate(tmp_path / "run", "hi", capsys=capsys)
    assert code == 2 and "no adapter yet" in err
    code, _, err = generate(tiny_model("gpt2"), "hi", chat=True, capsys=capsys)  # GPT-2 has no chat template
    assert code == 2 and "no chat template" in err


def test_outputs_stay_one_line_each():
    assert command.escape_line("a\nb\\n\r") == "a\\nb\\\\n\\r"


def test_prompts_get_the_format_the_adapter_was_trained_with(lora_run, capsys):
    assert command.recorded_format(str(lora_run)) == "alpaca"  # trained on the alpaca demo data
    wrapped = command.wrap_prompt(PROMPTS[1], "alpaca")
    assert wrapped.startswith("Below is an instruction") and wrapped.endswith("### Response:\n")
    code, lines, err = generate(lora_run, PROMPTS[1], capsys=capsys, prompt_format=None)
    assert code == 0, err
    assert lines == expected(lora_run, [wrapped]) != expected(lora_run, PROMPTS[1:])


def test_jsonl_stdin_carries_prompts_with_newlines(lora_run, monkeypatch, capsys):
    multi = "First line.\nSecond line."
    stdin = json.dumps({"prompt": multi}) + "\n" + json.dumps(PROMPTS[0]) + "\n"
    code, lines, err = generate(lora_run, stdin=stdin, monkeypatch=monkeypatch, capsys=capsys, jsonl=True)
    assert code == 0, err
    answers = [command.escape_line(json.loads(line)) for line in lines]
    assert answers == expected(lora_run, [multi, PROMPTS[0]])
    code, _, err = generate(lora_run, stdin="not json\n", monkeypatch=monkeypatch, capsys=capsys, jsonl=True)
    assert code == 2 and "stdin line 1: not JSON" in err
