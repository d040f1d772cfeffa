"""`peftctl eval`: a trained adapter against its base on held-out data of a task a tiny model learns in seconds
(whether a number is odd), with the numbers checked against a plain transformers loop, several adapters on one
loaded base, a user metric, and bad data refused with its file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_jsonl, run_cli
from peftctl.cli import eval as command
from peftctl.cli.errors import run_guarded
from peftctl.eval import metrics as M
from peftctl.eval.evaluate import EvalOptions, evaluate
from peftctl.eval.stats import Per, paired_difference
from peftctl.eval.targets import plan_groups, resolve_targets

NEW_TOKENS = 4
TEST_EXAMPLES = 48


def parity_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(rng.randrange(10)) for _ in range(3)]
        rows.append({"prompt": f"is {' '.join(digits)} odd?", "completion": " yes" if int(digits[-1]) % 2 else " no"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    return {"train": write_jsonl(root / "train.jsonl", parity_rows(800, 1)),
            "test": write_jsonl(root / "test.jsonl", parity_rows(TEST_EXAMPLES, 2))}


@pytest.fixture(scope="module")
def base(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def parity_run(base, trained, files):
    return trained("parity", base,
                   dataset={"path": str(files["train"]), "format": "prompt_completion", "max_length": 32},
                   method={"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
                   training={"max_steps": 60, "micro_batch_size": 4, "learning_rate": 1e-2,
                             "lr_scheduler": "constant"})


@pytest.fixture(scope="module")
def other_run(base, trained):
    """A second LoRA adapter of the same base (the demo data, a few steps): it predicts differently."""
    return trained("other", base, method={"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                          "targets": "all-linear"}, training={"learning_rate": 2e-2})


def options(files, **kw) -> EvalOptions:
    return EvalOptions(data=str(files["test"]), format="prompt_completion", max_new_tokens=NEW_TOKENS, batch_size=7,
                       **kw)


@pytest.fixture(scope="module")
def together(parity_run, other_run, files):
    """base, the parity adapter and the other adapter, evaluated on one loaded base."""
    return evaluate(["base", str(parity_run), str(other_run)], options(files))


def test_the_trained_adapter_beats_its_base_with_an_interval_excluding_zero(together):
    summary = together.summary
    assert [t["label"] for t in summary["targets"]][0] == "base"
    assert summary["data"]["examples"] == TEST_EXAMPLES and summary["data"]["format"] == "prompt_completion"
    trained_target = summary["targets"][1]
    em, loss = trained_target["vs_first"]["exact_match"], trained_target["vs_first"]["loss"]
    assert summary["targets"][0]["metrics"]["exact_match"] < trained_target["metrics"]["exact_match"]
    assert em["difference"] > 0 and em["excludes_zero"] and em["ci"][0] > 0
    assert loss["difference"] < 0 and loss["excludes_zero"] and loss["ci"][1] < 0
    assert trained_target["metrics"]["perplexity"] == pytest.approx(np.exp(trained_target["metrics"]["loss"]))


def test_several_adapters_share_one_loaded_base(parity_run, other_run):
    groups = plan_groups(resolve_targets(["base", str(parity_run), str(other_run)]))
    assert len(groups) == 1 and [m.label for m in groups[0].members] == [str(parity_run), str(other_run), "base"]


def test_adapters_switched_on_one_base_predict_as_when_loaded_alone(together, other_run, files):
    alone = evaluate([str(other_run)], options(files))
    label = str(other_run)
    assert alone.predictions[label] == together.predictions[label]
    assert together.predictions[label] != together.predictions["base"]  # the switch changed something
    joint = next(t for t in together.summary["targets"] if t["label"] == label)["metrics"]["loss"]
    assert alone.summary["targets"][0]["metrics"]["loss"] == pytest.approx(joint, rel=1e-5)


def plain_loop(run: Path, rows: list[dict]):
    """Predictions and mean trained-token loss with stock transformers + peft, one example at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    base = json.loads((adapter / "peftctl_adapter.json").read_text())["base_model"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(adapter)).eval()
    eos = tokenizer.eos_token_id
    predictions, loss_sum, trained = [], 0.0, 0
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        predictions.append(tokenizer.decode(new, skip_special_tokens=True))
        # Loss on the completion's tokens and the EOS that ends it, as training masks them.
        enc = tokenizer(row["prompt"] + row["completion"], return_offsets_mapping=True)
        full = enc["input_ids"] + [eos]
        mask = [start >= len(row["prompt"]) for start, _ in enc["offset_mapping"]] + [True]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0, -len(full):-1]  # past any virtual tokens
        target = torch.tensor(full[1:])
        losses = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
        keep = torch.tensor(mask[1:])
        loss_sum += float(losses[keep].sum())
        trained += int(keep.sum())
    return predictions, loss_sum / trained


def test_numbers_equal_a_plain_transformers_loop(together, parity_run, files):
    rows = read_jsonl(files["test"])
    predictions, loss = plain_loop(parity_run, rows)
    label = str(parity_run)
    assert together.predictions[label] == predictions
    metrics = next(t for t in together.summary["targets"] if t["label"] == label)["metrics"]
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
    references = [r["completion"] for r in rows]
    assert metrics["exact_match"] == pytest.approx(np.mean([M.exact_match(p, r) for p, r in zip(predictions,
                                                                                             references)]))


@pytest.mark.slow
def test_a_prompt_tuning_adapter_batched_with_left_padding_equals_the_plain_loop(base, trained, files):
    """Virtual tokens in front of left-padded prompts: the batched path still predicts what one-at-a-time does."""
    run = trained("prompt", base, method={"name": "prompt_tuning", "num_virtual_tokens": 4, "_replace": True},
                  dataset={"path": str(files["train"]), "format": "prompt_completion", "max_length": 32,
                           "packing": False}, training={"max_steps": 4, "learning_rate": 1e-1})
    result = evaluate([str(run)], options(files, limit=16, metrics=["exact_match", "loss"]))
    predictions, loss = plain_loop(run, read_jsonl(files["test"])[:16])
    assert result.predictions[str(run)] == predictions
    assert result.summary["targets"][0]["metrics"]["loss"] == pytest.approx(loss, rel=1e-4)


def test_a_user_metric_is_loaded_and_applied(parity_run, files, tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text("def says_yes(prediction, reference):\n"
                                            "    return prediction.strip() == 'yes'\n"
                                            "def length(prediction, reference):\n"
                                            "    return len(prediction)\n")
    monkeypatch.chdir(tmp_path)
    result = evaluate([str(parity_run)], options(files, limit=12, metrics=["my_metrics:says_yes",
                                                                            "./my_metrics.py:length"]))
    predictions = result.predictions[str(parity_run)]
    scores = result.scores[str(parity_run)]
    assert scores["my_metrics:says_yes"] == [float(p.strip() == "yes") for p in predictions]
    assert scores["./my_metrics.py:length"] == [float(len(p)) for p in predictions]
    assert result.summary["targets"][0]["metrics"]["./my_metrics.py:length"] == pytest.approx(
        np.mean([len(p) for p in predictions]))


def run_eval(targets, data, capsys, **kw):
    args = dict(format="prompt_completion", fields=[], metrics=[], max_new_tokens=NEW_TOKENS, batch_size=4,
                max_length=None, limit=None, json_output=True, out=None, force=False, bootstrap=200, seed=0)
    args.update(kw)
    code = run_guarded(lambda: command.run([str(t) for t in targets], data=str(data), **args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_data_is_exit_2_with_file_and_line(parity_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = parity_rows(4, 3)
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"prompt": "is 1 odd?"})  # no completion
    bad.write_text("\n".join(lines) + "\n")
    code, out, err = run_eval([parity_run], bad, capsys)
    assert code == 2 and out == ""
    assert f"{bad} line 3" in err and "missing field 'completion'" in err and "Traceback" not in err
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    code, _, err = run_eval([parity_run], bad, capsys)
    assert code == 2 and f"{bad} line 2" in err and "not valid JSON" in err


def test_a_failing_user_metric_names_the_example(parity_run, files, tmp_path, capsys):
    (tmp_path / "m.py").write_text("def boom(prediction, reference):\n    raise ValueError('no')\n")
    code, _, err = run_eval([parity_run], files["test"], capsys, metrics=[f"{tmp_path / 'm.py'}:boom"], limit=2)
    assert code == 2 and f"{files['test']} line 1" in err and "ValueError" in err


def test_arguments_are_checked_before_any_model_loads(parity_run, files, tmp_path, capsys):
    code, _, err = run_eval([parity_run], files["test"], capsys, metrics=["bleu"])
    assert code == 2 and "unknown metric 'bleu'" in err
    code, _, err = run_eval(["base", tmp_path], files["test"], capsys)
    assert code == 2 and "neither a run folder" in err
    existing = tmp_path / "mine.jsonl"
    existing.write_text("keep me\n")
    code, _, err = run_eval([parity_run], files["test"], capsys, out=str(existing))
    assert code == 2 and "--force" in err and existing.read_text() == "keep me\n"
    code, _, err = run_eval(["base"], files["test"], capsys)
    assert code == 2 and "base:MODEL" in err


def test_json_on_stdout_and_each_examples_predictions_in_out(parity_run, files, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    code, stdout, err = run_eval(["base", parity_run], files["test"], capsys, limit=8, metrics=["exact_match,loss"],
                                 out=str(out))
    loss_only = tmp_path / "loss_only.jsonl"
    assert run_eval([parity_run], files["test"], capsys, limit=2, metrics=["loss"], out=str(loss_only))[0] == 0
    assert all(r["predictions"][str(parity_run)] is not None for r in read_jsonl(loss_only))  # --out asks for them
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["metrics"] == ["exact_match", "loss"] and summary["data"]["examples"] == 8
    records = read_jsonl(out)
    tests = read_jsonl(files["test"])[:8]
    assert [r["reference"] for r in records] == [t["completion"] for t in tests]
    assert [r["prompt"] for r in records] == [t["prompt"] for t in tests]
    assert set(records[0]["predictions"]) == {"base", str(parity_run)}
    em = np.mean([r["scores"][str(parity_run)]["exact_match"] for r in records])
    assert summary["targets"][1]["metrics"]["exact_match"] == pytest.approx(em)


@pytest.mark.slow
def test_cli_prints_the_table(parity_run, files):
    done = run_cli("eval", "base", str(parity_run), "--data", str(files["test"]), "--limit", "6",
                   "--max-new-tokens", str(NEW_TOKENS), "--metrics", "exact_match,loss")
    assert done.returncode == 0, done.stderr
    assert "exact match" in done.stdout and "difference to base" in done.stdout


def test_normalisation_and_text_metrics():
    assert M.normalize("  The\tCat\n SAT ") == "the cat sat"
    assert M.exact_match(" even", "Even\n") == 1.0 and M.exact_match("even.", "even") == 0.0
    assert M.token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0
    assert M.rouge_l("the cat sat", "the cat sat") == 1.0 and M.rouge_l("dog", "the cat") == 0.0
    assert M.parse_metrics(["em,ppl", "f1"]) == ["exact_match", "perplexity", "token_f1"]


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = Per({"m": rng.integers(0, 2, 200).astype(float)})
    same = paired_difference(a, a, "m")
    assert same["difference"] == 0 and not same["excludes_zero"]
    better = Per({"m": np.minimum(1.0, a.scores["m"] + (rng.random(200) < 0.3))})
    diff = paired_difference(a, better, "m")
    assert diff["excludes_zero"] and diff["ci"][0] > 0 and diff["ci"][0] <= diff["difference"] <= diff["ci"][1]
    noisy = Per({"m": rng.integers(0, 2, 200).astype(float)})  # unrelated coin flips: no real difference
    assert paired_difference(a, noisy, "m")["ci"][0] < paired_difference(a, noisy, "m")["difference"]
    loss_a = Per({}, np.array([2.0, 4.0]), np.array([1, 3]))
    assert loss_a.value("loss") == pytest.approx(1.5)


def test_train_evaluates_the_adapter_at_the_end(base, files, write_recipe, tmp_path, capsys):
    from peftctl.cli import train as train_command

    parity = {"path": str(files["train"]), "format": "prompt_completion", "max_length": 32}
    recipe = write_recipe(base, dataset=parity, training={"max_steps": 2},
                          evaluation={"data": str(files["test"]), "limit": 6, "max_new_tokens": NEW_TOKENS,
                                      "metrics": ["exact_match", "loss"]})
    code = run_guarded(lambda: train_command.run(str(recipe), [], dry_run=False, resume=None, force=False,
                                                 quiet=False, log_format="text", gpus=None))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 0, out
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    evaluation = manifest["evaluation"]
    assert manifest["status"] == "completed"
    assert [t["label"] for t in evaluation["targets"]] == ["base", str(tmp_path / "run" / "adapter")]
    assert evaluation["data"]["examples"] == 6 and evaluation["metrics"] == ["exact_match", "loss"]
    assert "exact match" in out and "difference to base" in out  # the summary shows the table


def test_bad_evaluation_data_stops_the_run_before_training(base, files, write_recipe, tmp_path, capsys):
    from peftctl.cli import train as train_command

    bad = write_jsonl(tmp_path / "held_out.jsonl", parity_rows(3, 5))
    bad.write_text(bad.read_text() + '{"prompt": "is 3 odd?", "completion": 7}\n')
    parity = {"path": str(files["train"]), "format": "prompt_completion", "max_length": 32}
    recipe = write_recipe(base, dataset=parity, training={"max_steps": 2}, evaluation={"data": "held_out.jsonl"})
    code = run_guarded(lambda: train_command.run(str(recipe), [], dry_run=False, resume=None, force=False,
                                                 quiet=True, log_format="text", gpus=None))
    err = capsys.readouterr().err
    assert code == 2 and f"{bad} line 4" in err and "must be text" in err
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_eval_benchmark_smoke_run(tmp_path):
    """scripts/bench_eval.py shrunk on the CPU: both sides run and report examples/s for the same examples."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_eval.py"), "--shrink", "--device", "cpu",
                           "--quant", "none", "--examples", "6", "--plain-examples", "2", "--max-new-tokens", "8",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=str(REPO), timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "bench_eval.json").read_text())
    assert report["peftctl"]["generated_tokens"] == 6 * 8  # random weights never stop early
    assert report["peftctl"]["examples_per_s"] > 0 and report["plain"]["examples"] == 2
    assert report["speedup"] == pytest.approx(report["peftctl"]["examples_per_s"] / report["plain"]["examples_per_s"],
                                              rel=0.01)
    assert "examples/s  peftctl eval" in done.stdout


@pytest.mark.gpu
def test_eval_benchmark_on_the_gpu_with_a_4bit_base(tmp_path):
    """The benchmark's 4-bit path on a GPU, shrunk: the QLoRA adapter is evaluated on its 4-bit base, batched."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_eval.py"), "--shrink", "--examples", "64",
                           "--plain-examples", "8", "--max-new-tokens", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=str(REPO), timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "bench_eval.json").read_text())
    assert report["quantization"] == "4bit" and report["peftctl"]["generated_tokens"] == 64 * 16
    assert report["speedup"] > 1  # 64 prompts per call against one at a time


def test_eval_data_is_tokenised_and_masked_as_training_does(base, tmp_path):
    """Every example's tokens and labels equal those of training's own pass; prompts and references split where
    the trained span starts (alpaca) or at the last assistant turn (chat)."""
    from conftest import DEMO_DATA
    from peftctl.data.formats import FormatOptions
    from peftctl.data.prepare import _tokenize_all
    from peftctl.data.sources import load_sources
    from peftctl.eval.data import read_eval_data
    from peftctl.model import load_tokenizer
    from peftctl.recipe.schema import ModelSection

    tokenizer = load_tokenizer(ModelSection(name=str(base)))
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour of snow?"},
                      {"role": "assistant", "content": "White."}]}])
    for path, fmt in ((DEMO_DATA, "alpaca"), (chat, "chat")):
        options = FormatOptions(fmt, {})
        ours = read_eval_data(str(path), options, tokenizer, max_length=64)
        theirs, _, _ = _tokenize_all(load_sources(str(path)), options, tokenizer, 64, "error", None)
        assert [e.input_ids for e in ours.examples] == [list(x) for x in theirs["input_ids"]]
        assert [e.labels for e in ours.examples] == [list(x) for x in theirs["labels"]]
    rows = read_jsonl(DEMO_DATA)
    first = read_eval_data(str(DEMO_DATA), FormatOptions("alpaca", {}), tokenizer, max_length=512).examples[0]
    assert first.reference == rows[0]["output"] and first.prompt.endswith("### Response:\n")
    assert rows[0]["input"] in first.prompt and first.where == f"{DEMO_DATA} line 1"
    example = ours.examples[0]
    messages = read_jsonl(chat)[0]["messages"]
    assert example.reference == "White."
    assert example.prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert example.prompt_ids == tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
