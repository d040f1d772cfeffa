"""`peftctl train` end to end on tiny models: LoRA and QLoRA learn, only the adapter changes, the adapter reloads
through stock peft, the run folder holds what docs/RECIPE.md promises, and packing changes nothing but speed."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, cli, read_jsonl, run_cli
from peftctl.recipe.loader import load_recipe
from peftctl.train.loop import TrainOptions, train

LEARN = dict(method={"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear",
                     "_replace": True},
             training={"max_steps": 14, "micro_batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 2})


def run_train(recipe_path, *sets, **options):
    loaded = load_recipe(str(recipe_path), list(sets))
    return train(loaded, TrainOptions(quiet=True, **options)), loaded.recipe


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def falls(values: list[float]) -> bool:
    head, tail = values[:3], values[-3:]
    return sum(tail) / len(tail) < sum(head) / len(head) - 1.0


@pytest.mark.parametrize("arch", ["qwen2"])  # llama: test_only_the_adapter_changes... trains the same recipe
def test_lora_learns(tiny_model, write_recipe, arch):
    result, recipe = run_train(write_recipe(tiny_model(arch), **LEARN))
    values = losses(recipe.output.dir)
    assert len(values) == 14 and all(math.isfinite(v) for v in values)
    assert falls(values), values


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_qlora_learns_on_a_4bit_base(tiny_model, write_recipe, arch):
    learn = {**LEARN, "method": {**LEARN["method"], "name": "qlora"}}
    result, recipe = run_train(write_recipe(tiny_model(arch), **learn),
                               "quantization.compute_dtype=float32")
    assert recipe.quantization.bits == 4
    manifest = json.loads((Path(recipe.output.dir) / "run.json").read_text())
    assert manifest["model"]["quantization"]["quant_type"] == "nf4" and manifest["status"] == "completed"
    assert falls(losses(recipe.output.dir)), losses(recipe.output.dir)


def test_only_the_adapter_changes_and_it_reloads_in_stock_peft(tiny_model, write_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftctl.train import loop

    model_dir = tiny_model("llama")
    x = torch.tensor([[5, 17, 42, 99, 7, 3]])
    seen = {}
    original = loop.save_adapter

    def spy(model, *args, **kwargs):  # the trained model, just before its adapter is written
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=x).logits
        seen["params"] = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        return original(model, *args, **kwargs)

    loop.save_adapter = spy
    try:
        result, recipe = run_train(write_recipe(model_dir, **LEARN))
    finally:
        loop.save_adapter = original
    values = losses(recipe.output.dir)  # LoRA learns on llama (test_lora_learns for the other families)
    assert len(values) == 14 and all(math.isfinite(v) for v in values)
    assert falls(values), values

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    trained = {n for n, (_, grad) in seen["params"].items() if grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    for name, (value, grad) in seen["params"].items():
        if grad:
            continue
        base_name = name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
        assert torch.equal(value, fresh[base_name]), name  # frozen weights did not move
    assert any(v.abs().sum() > 0 for n, (v, _) in seen["params"].items() if ".lora_B." in n)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(Path(recipe.output.dir) / "adapter")).eval()
    with torch.no_grad():
        reloaded = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert torch.allclose(reloaded, seen["logits"], atol=1e-5), (reloaded - seen["logits"]).abs().max()
    assert not torch.allclose(reloaded, plain, atol=1e-3)


def test_run_folder_contract(tiny_model, write_recipe):
    path = write_recipe(tiny_model("llama"), dataset={"validation": 0.2}, training={"eval_every": 2})
    result, recipe = run_train(path)
    run = Path(recipe.output.dir)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "recipe.yaml", "run.json", "metrics.jsonl", "loss.png"):
        assert (run / name).exists(), name
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert Path(resolved["model"]["name"]).is_absolute() and Path(resolved["dataset"]["path"]).is_absolute()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["exit_code"] == 0 and manifest["steps_done"] == 4
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert manifest["data"]["fingerprint"] and manifest["data"]["train"]["examples"] > 0
    assert manifest["params"]["trainable"] == result.counts["trainable"]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]),
                                                                                      rel=1e-4) for r in evals)


def test_packing_changes_nothing_but_the_rows(tiny_model, write_recipe):
    """The loss of a packed step equals the token-weighted loss of the same examples unpacked."""
    from peftctl.data.prepare import prepare
    from peftctl.model import load_model, load_tokenizer, pick_device
    from peftctl.train.loss import loss_sum

    for arch in ("llama", "qwen2", "mistral", "gemma", "gpt2"):
        loaded = load_recipe(str(write_recipe(tiny_model(arch), name=f"{arch}.yaml")))
        recipe = loaded.recipe
        tok = load_tokenizer(recipe.model)
        packed = prepare(recipe.dataset, tok, seed=0, pad_id=tok.pad_token_id, packed=True)
        unpacked = prepare(recipe.dataset, tok, seed=0, pad_id=tok.pad_token_id, packed=False)
        model = load_model(recipe, pick_device()).eval()
        rows = packed.train.rows[:3]
        examples = sorted(i for row in rows for i in row)
        with torch.no_grad():
            batch = packed.micro_batches(packed.train, list(range(3)), 3)[0]
            packed_loss = loss_sum(model, batch) / batch.n_trained
            singles = unpacked.micro_batches(unpacked.train, examples, 4)
            total = sum(loss_sum(model, b) for b in singles)
            unpacked_loss = total / sum(b.n_trained for b in singles)
        assert batch.n_trained == sum(b.n_trained for b in singles)
        assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5), arch


def test_json_log_format_prints_one_object_per_step(tiny_model, write_recipe):  # train's one CLI smoke test
    result = run_cli("train", str(write_recipe(tiny_model("llama"))), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["type"] == "step" for r in records if "loss" in r)
    final = records[-1]  # the last line says how the run ended
    assert final["type"] == "final" and final["status"] == "completed" and final["exit_code"] == 0
    assert final["run_dir"].endswith("run") and final["steps_done"] == 4
    assert "trainable params:" in result.stderr


def test_metrics_records_say_step_or_eval(tmp_path, capsys):
    from peftctl.train.metrics import Metrics

    metrics = Metrics(tmp_path / "metrics.jsonl", total_steps=2, log_format="json")
    metrics.log({"step": 1, "loss": 2.0, "lr": 1e-3})
    metrics.log({"step": 1, "eval_loss": 1.5, "eval_ppl": 4.5})
    metrics.final({"status": "failed", "exit_code": 1, "run_dir": str(tmp_path)})
    metrics.close("failed")
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["type"] for r in printed] == ["step", "eval", "final"]
    saved = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in saved] == ["step", "eval"]  # the final record is for the console only


def test_loss_curve_is_smoothed_and_titled(tmp_path):
    from peftctl.train.metrics import plot_loss, smooth

    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # debiased: no dip towards 0 at the start
    noisy = [3.0 + (0.5 if i % 2 else -0.5) - i * 0.01 for i in range(100)]
    smoothed = smooth(noisy)
    wiggle = lambda xs: sum(abs(a - b) for a, b in zip(xs[50:], xs[51:]))  # noqa: E731
    assert wiggle(smoothed) < wiggle(noisy) / 5 and smoothed[-1] == pytest.approx(3 - 0.99, abs=0.3)  # the trend
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    titles = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        titles.append(fig.axes[0].get_title())
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert "train (smoothed)" in labels
        return real_savefig(fig, *args, **kwargs)

    (tmp_path / "my-run").mkdir()
    plt.Figure.savefig = savefig
    try:
        assert plot_loss([{"step": i + 1, "loss": v} for i, v in enumerate(noisy)], tmp_path / "my-run" / "loss.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert titles == ["my-run: loss"] and (tmp_path / "my-run" / "loss.png").exists()


def test_dry_run_plan_goes_to_stdout(tiny_model, write_recipe, capsys):
    from peftctl.cli import train as command
    from peftctl.cli.errors import run_guarded

    recipe = write_recipe(tiny_model("llama"))
    code = run_guarded(lambda: command.run(str(recipe), [], dry_run=True, resume=None, force=False, quiet=False,
                                           log_format="text", gpus=None))
    out, err = capsys.readouterr()
    assert code == 0 and "plan (dry run" in out and "total steps" in out and "plan (dry run" not in err


def test_an_existing_run_is_not_overwritten(tiny_model, trained, write_recipe):
    """Refused before anything is written (that --force then trains over it: test_safety's force tests)."""
    from peftctl.train.run_folder import LOCK_FILE

    run = trained("existing", tiny_model("llama"))
    def files():  # all but the lock, which every attempt takes
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_FILE}

    before = files()
    again = cli("train", str(write_recipe(tiny_model("llama"), out=run)), "--quiet")
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--force" in again.stderr
    assert files() == before


def test_missing_models_exit_2_and_say_what_was_tried(tmp_path, write_recipe):
    result = cli("train", str(write_recipe("./no-such-model")))
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = cli("train", str(write_recipe("nobody/no-such-model-xyz")), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "nobody/no-such-model-xyz" in result.stderr and "tried" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_rows_stop_before_training_with_row_number(tmp_path, tiny_model, write_recipe):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    result = cli("train", str(write_recipe(tiny_model("llama"), data=data)))
    assert result.returncode == 2 and f"{data} line 2: missing field 'output'" in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_demo_recipe_loss_falls(tiny_model, tmp_path):
    """The README's main job, on the model the demo uses (tiny_model makes it the same way, with the same seed)."""
    model = tiny_model("llama")
    loaded = load_recipe(str(REPO / "recipes" / "demo.yaml"), [f"model.name={model}", f"output.dir={tmp_path}/run",
                                                                "training.max_steps=30"])
    result = train(loaded, TrainOptions(quiet=True))
    values = losses(tmp_path / "run")
    assert falls(values) and result.eval_loss < values[0] - 1.5, (values, result.eval_loss)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_folder_files_follow_the_umask(tmp_path, umask):
    from peftctl.files import atomic_write_text, staged_dir

    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "run.json", "{}")
        with staged_dir(tmp_path / "adapter") as tmp:
            (tmp / "weights").write_bytes(b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "adapter" / "weights").stat().st_mode) == 0o666 & ~umask


def test_a_trained_run_folder_has_one_mode_for_files_and_one_for_folders(tiny_model, trained):
    run = trained("modes", tiny_model("llama"))
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [run, *run.rglob("*")]}
    assert modes == {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}, modes


class _Cycle:
    pass


def _collectable_after(run_model_refs: list) -> bool:
    import gc

    gc.collect()
    return all(ref() is None for ref in run_model_refs)


@pytest.fixture
def collector_probe(monkeypatch):
    """Records the collector's state in setup, at every settle and at the start of `finish`, and a weak reference
    to each run's model; drops a garbage cycle just before the freeze at the second step."""
    import gc
    import weakref

    from peftctl.train import loop

    probe = {"setup": [], "settle": [], "finish": [], "models": [], "cycle": []}
    setup, settle, update, finish = loop.setup, loop.settle, loop.clip_and_update, loop.finish

    def setting_up(*args, **kwargs):
        probe["setup"].append(gc.get_threshold())
        return setup(*args, **kwargs)

    def settling(run, launched):
        probe["settle"].append((gc.get_freeze_count(), gc.get_threshold()))
        return settle(run, launched)

    def updating(run, launched, stop):
        update(run, launched, stop)
        if run.first_step_s is not None and not probe["cycle"]:  # a cycle dropped just before the freeze (the
            # second step's), which only a collection frees
            garbage = _Cycle()
            garbage.me = garbage
            probe["cycle"].append(weakref.ref(garbage))

    def finishing(run):
        probe["finish"].append((gc.get_freeze_count(), gc.get_threshold()))
        probe["models"].append(weakref.ref(run.model))
        return finish(run)

    for name, patched in (("setup", setting_up), ("settle", settling), ("clip_and_update", updating),
                          ("finish", finishing)):
        monkeypatch.setattr(loop, name, patched)
    return probe


def test_the_collector_skips_full_collections_in_setup_freezes_at_the_second_step_and_is_restored(
        tiny_model, write_recipe, collector_probe):
    """Setup and the first step run without full collections (the first step's line is not delayed by one); from
    the second step's update on, what setup left alive is out of the collector's sight (a full collection then
    walks only what the loop made) and the thresholds are the caller's again; garbage cycles alive at the freeze
    are collected, not frozen with them; the end of the run (`finish`) and after it see the collector as it was,
    and the run's model can be collected. A caller that had frozen objects of its own keeps them frozen, and the
    run freezes nothing of its own then."""
    import gc
    import sys
    import weakref

    import peft  # noqa: F401 - imported here, not first inside a run: see below

    from peftctl.train.collector import NO_FULL_COLLECTION

    # (bitsandbytes, which peft imports, logs a warning with an exception as its argument on some CPUs; pytest keeps
    # the log record, and the exception's traceback would keep the importing frames -- setup's, with the model --
    # alive for the rest of the test, whatever the collector does.)
    thresholds = gc.get_threshold()
    gc.disable()  # no automatic collection may free the cycle instead of the loop's
    try:
        run_train(write_recipe(tiny_model("llama"), training={"max_steps": 3, "micro_batch_size": 2}))
    finally:
        gc.enable()
    probe = collector_probe
    if sys.version_info < (3, 14):  # 3.14's incremental collector ignores the oldest generation's threshold
        assert probe["setup"] == [(*thresholds[:2], NO_FULL_COLLECTION)]
    assert len(probe["settle"]) == 3
    assert probe["settle"][0][0] == 0 and probe["settle"][0][1][2] == NO_FULL_COLLECTION  # the first: not yet
    assert all(count > 1000 and now == thresholds for count, now in probe["settle"][1:])
    assert probe["cycle"][0]() is None  # collected, not frozen
    assert probe["finish"] == [(0, thresholds)] and gc.get_threshold() == thresholds
    assert _collectable_after(probe["models"])

    kept = _Cycle()  # a host program's own frozen objects, among them a garbage cycle that only the freeze keeps
    kept.me = kept
    kept_ref = weakref.ref(kept)
    del kept
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_train(write_recipe(tiny_model("llama"), "again.yaml", training={"max_steps": 2, "micro_batch_size": 2},
                               out="again"))
        assert probe["settle"][-1][0] <= frozen  # the run froze nothing of its own (objects freed by count drop)
        gc.collect()
        assert kept_ref() is not None  # still frozen: the run did not unfreeze the caller's objects
        assert _collectable_after(probe["models"][1:])
    finally:
        gc.unfreeze()


def test_the_collector_is_restored_by_a_run_with_no_step_and_by_a_failure(tiny_model, write_recipe, monkeypatch,
                                                                           collector_probe):
    """A run that reaches no step (a resume at its last step) ends with the caller's thresholds before `finish`;
    a failure in setup, and one after the freeze, leave the collector as it was."""
    import gc

    from peftctl.errors import InvalidInput
    from peftctl.train import loop

    thresholds = gc.get_threshold()
    monkeypatch.setattr(loop, "run_steps", lambda run, batches, stop: None)
    run_train(write_recipe(tiny_model("llama"), training={"max_steps": 2, "micro_batch_size": 2}))
    assert collector_probe["finish"] == [(0, thresholds)]
    monkeypatch.undo()

    def failing_setup(*args, **kwargs):
        raise InvalidInput("stopped in setup")

    monkeypatch.setattr(loop, "setup", failing_setup)
    with pytest.raises(InvalidInput):
        run_train(write_recipe(tiny_model("llama"), "failing.yaml", out="failing"))
    assert gc.get_threshold() == thresholds
    monkeypatch.undo()

    after_step = loop.after_step

    def failing_later(run, step, stop):
        if run.state.step >= 2:  # the freeze is at the second step's update, before this
            assert gc.get_freeze_count() > 0
            raise RuntimeError("failed after the freeze")
        return after_step(run, step, stop)

    monkeypatch.setattr(loop, "after_step", failing_later)
    with pytest.raises(RuntimeError, match="after the freeze"):
        run_train(write_recipe(tiny_model("llama"), "later.yaml", training={"max_steps": 3, "micro_batch_size": 2},
                               out="later"))
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
