"""Runs that survive: exact resume, hashed checkpoints, signals, non-finite values, disk, and secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli, fused_adamw, read_jsonl
from peftctl.recipe.loader import load_recipe
from peftctl.train import checkpoint as ckpt
from peftctl.train.loop import TrainOptions, train

RESUMABLE = dict(method={"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "targets": ["q_proj", "v_proj"],
                         "_replace": True},
                 training={"max_steps": 8, "micro_batch_size": 2, "learning_rate": 2e-3, "warmup_steps": 2,
                           "save_every": 2, "keep_checkpoints": 2, "lr_scheduler": "cosine"},
                 dataset={"validation": 0.1})


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def start_train(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftctl", "train", str(recipe), "--log-format", "json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))


def wait_for_step(proc: subprocess.Popen, step: int) -> None:
    for line in proc.stdout:
        record = json.loads(line)
        if record.get("step", 0) >= step and "loss" in record:
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    """The uninterrupted run to 8 steps that interrupted runs must reproduce."""
    import yaml

    from conftest import recipe_dict

    folder = tmp_path_factory.mktemp("reference")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model("llama"), out=folder / "run", **RESUMABLE)))
    train(load_recipe(str(path)), TrainOptions(quiet=True))
    return folder / "run"


def test_sigterm_checkpoints_and_resume_is_exact(tiny_model, write_recipe, reference_run, tmp_path):
    recipe = write_recipe(tiny_model("llama"), **RESUMABLE)
    proc = start_train(recipe)
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    run = tmp_path / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 143
    stopped_at = manifest["steps_done"]
    assert 3 <= stopped_at < 8 and (run / "checkpoints" / ckpt.name_for(stopped_at)).is_dir()

    result = cli("train", str(recipe), "--resume", "auto", "--quiet")
    assert result.returncode == 0, result.stderr
    assert losses(run) == losses(reference_run)  # the same loss at every step, to the last digit logged
    resumed_manifest = json.loads((run / "run.json").read_text())
    resume = resumed_manifest["resume"]  # run.json records the resume and the interrupted attempt's timings
    assert resume["step"] == stopped_at and resume["checkpoint"].endswith(ckpt.name_for(stopped_at))
    assert [e["status"] for e in resume["earlier"]] == ["stopped"]
    timings = resumed_manifest["timings"]
    assert timings["train_s_all_attempts"] == pytest.approx(timings["train_s"] + resume["earlier_train_s"], abs=0.02)
    assert resume["earlier_train_s"] == manifest["timings"]["train_s"] > 0
    resumed, reference = adapter_weights(run), adapter_weights(reference_run)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # bitwise, on the CPU


def test_second_sigint_aborts_at_once(tiny_model, write_recipe, tmp_path):
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 10_000, "save_every": 10_000})
    proc = start_train(recipe)
    wait_for_step(proc, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = tmp_path / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] in ("aborted", "stopped")
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name)]
    assert not leftovers
    assert all((p / ckpt.MANIFEST).exists() for p in ckpt.list_checkpoints(run / "checkpoints"))


def test_checkpoint_layout_and_pruning(reference_run):
    points = ckpt.list_checkpoints(reference_run / "checkpoints")  # RESUMABLE: 8 steps, save_every 2, keep 2
    assert [p.name for p in points] == ["step_000004", "step_000006"]  # keep 2; none at the final step
    files = {p.name for p in points[-1].iterdir()}
    assert {"adapter_state.safetensors", "optimizer.pt", "scheduler.json", "rng.json", "trainer_state.json",
            "recipe.yaml", "manifest.json"} <= files
    state = json.loads((points[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data_fingerprint"]
    rng = json.loads((points[-1] / "rng.json").read_text())
    assert {"python", "numpy", "torch", "cuda"} <= set(rng)


def test_damaged_checkpoint_is_refused_and_auto_falls_back(tiny_model, write_recipe, tmp_path):
    recipe = write_recipe(tiny_model("llama"), **RESUMABLE)
    train(load_recipe(str(recipe), ["training.max_steps=6", "training.keep_checkpoints=3"]), TrainOptions(quiet=True))
    points = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    newest = points[-1]
    weights = newest / "adapter_state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    with pytest.raises(ckpt.DamagedCheckpoint, match="does not match its hash"):
        ckpt.verify(newest)
    result = cli("train", str(recipe), "--resume", str(newest))
    assert result.returncode == 2 and "does not match its hash" in result.stderr
    # The run completed at 6 steps: the same recipe has nothing to resume (see test_safety); training on to 8 does.
    result = cli("train", str(recipe), "--resume", "auto", "--set", "training.max_steps=8",
                     "--set", "training.keep_checkpoints=3")
    assert result.returncode == 0, result.stderr
    assert f"skipping {newest.name}" in result.stderr and f"resuming from {points[-2]}" in result.stderr


def test_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    fake = tmp_path / "checkpoints" / "step_000010"
    fake.mkdir(parents=True)
    (fake / "adapter_state.safetensors").write_bytes(b"x")
    path, notes = ckpt.find_resumable(tmp_path / "checkpoints", "auto")
    assert path is None and "no manifest" in notes[0]


def test_resume_refuses_a_changed_recipe_but_allows_cadence(tiny_model, write_recipe, tmp_path):
    recipe = write_recipe(tiny_model("llama"), **RESUMABLE)
    train(load_recipe(str(recipe), ["training.max_steps=4"]), TrainOptions(quiet=True))
    result = cli("train", str(recipe), "--resume", "auto", "--set", "method.r=4")
    assert result.returncode == 2 and "method.r: 8 -> 4" in result.stderr
    result = cli("train", str(recipe), "--resume", "auto", "--set", "training.learning_rate=0.1")
    assert result.returncode == 2 and "training.learning_rate" in result.stderr
    result = cli("train", str(recipe), "--resume", "auto", "--set", "training.eval_every=3")
    assert result.returncode == 0, result.stderr
    assert "changed since the checkpoint: training.eval_every" in result.stderr


def test_a_changed_recipe_is_refused_before_the_model_loads(tiny_model, write_recipe, monkeypatch):
    """The refusal needs only the checkpoint's recipe.yaml: it comes before the (slow) model load."""
    from peftctl.errors import InvalidInput

    recipe = write_recipe(tiny_model("llama"), **RESUMABLE)
    train(load_recipe(str(recipe), ["training.max_steps=3"]), TrainOptions(quiet=True))  # a checkpoint at step 2
    loads = []
    monkeypatch.setattr("peftctl.model.load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    with pytest.raises(InvalidInput, match=r"recipe changed what is trained") as refused:
        train(load_recipe(str(recipe), ["method.r=4"]), TrainOptions(resume="auto", quiet=True))
    assert "method.r: 8 -> 4" in refused.value.message
    assert loads == []


def _patched_loss(monkeypatch, bad_steps: set[int]):
    """Make the loss NaN on the given (1-based) optimiser steps."""
    from peftctl.train import loss as loss_module

    original = loss_module.build_loss
    calls = {"n": 0}

    def build(model, spec, device, **kwargs):
        fn, name = original(model, spec, device, **kwargs)

        def wrapped(m, batch):
            value = fn(m, batch)
            if m.training:
                calls["n"] += 1
                if calls["n"] in bad_steps:
                    return value * float("nan")
            return value
        return wrapped, name

    monkeypatch.setattr(loss_module, "build_loss", build)


@pytest.fixture(params=["foreach", "fused"])
def optimizer_kind(request, monkeypatch):
    """Both update paths of the loop: the update after the host's check (the CPU's AdamW), and the update queued
    before it, skipped on the device through `found_inf` (torch's fused AdamW, as on a GPU; torch has it on the CPU
    too)."""
    if request.param == "fused":
        from peftctl.train import optim

        monkeypatch.setattr(optim, "build_optimizer", fused_adamw(optim.build_optimizer))
    return request.param


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                             optimizer_kind):
    _patched_loss(monkeypatch, {3})
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 6, "save_every": 100})
    from peftctl.errors import PeftctlError

    with pytest.raises(PeftctlError, match="non-finite loss at step 3") as err:
        train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    assert "non-finite loss at step 3" in err.value.message and err.value.exit_code == 1
    assert "learning_rate" in err.value.hint
    points = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in points] == ["step_000002"]
    weights = load_file(str(points[0] / "adapter_state.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_queued_update_on_a_nonfinite_step_changes_nothing(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                             optimizer_kind):
    """The stop after a NaN at step 3 saves exactly the state of a clean two-step run: weights, Adam's moments and
    its step count (the fused update was queued on the NaN step, and skipped itself)."""
    model = tiny_model("llama")
    constant = {"lr_scheduler": "constant", "save_every": 100}  # the same rates whatever max_steps says
    clean = write_recipe(model, "clean.yaml", training={"max_steps": 3, **constant, "save_every": 2},
                         out=tmp_path / "clean")
    train(load_recipe(str(clean)), TrainOptions(quiet=True))
    _patched_loss(monkeypatch, {3})
    broken = write_recipe(model, "nan.yaml", training={"max_steps": 6, **constant}, out=tmp_path / "nan")
    from peftctl.errors import PeftctlError

    with pytest.raises(PeftctlError, match="non-finite loss at step 3"):
        train(load_recipe(str(broken)), TrainOptions(quiet=True))
    [good] = ckpt.list_checkpoints(tmp_path / "clean" / "checkpoints")
    [kept] = ckpt.list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert kept.name == good.name == "step_000002"
    a, b = (load_file(str(p / "adapter_state.safetensors")) for p in (good, kept))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (good, kept))
    assert a.keys() == b.keys()
    for key in a:
        assert float(b[key]["step"]) == 2.0
        assert all(torch.equal(a[key][field], b[key][field]) for field in ("exp_avg", "exp_avg_sq"))


def test_the_update_waits_for_the_host_where_it_cannot_skip_itself():
    """Queued only with a fused optimiser and no GradScaler, outside FSDP; queued, a non-finite loss leaves the
    weights as they were."""
    import types

    from peftctl.train.loop import _queue_update

    p = torch.nn.Parameter(torch.ones(3))

    def run(fused=True, scaler=None, engine=None):
        p.grad = torch.ones(3)
        optimizer = torch.optim.AdamW([p], lr=0.1, fused=fused or None)
        return types.SimpleNamespace(optimizer=optimizer, scaler=scaler, engine=engine)

    finite, norm = torch.tensor(1.0), torch.tensor(1.0)
    for waiting in (run(fused=False), run(scaler=object()), run(engine="fsdp")):
        assert not _queue_update(waiting, finite, norm) and torch.equal(p.data, torch.ones(3))
    assert _queue_update(run(engine="ddp"), torch.tensor(float("nan")), norm)
    assert torch.equal(p.data, torch.ones(3)) and p.grad is None  # skipped on the device, gradients cleared
    assert _queue_update(run(), finite, norm) and not torch.equal(p.data, torch.ones(3))


AHEAD = dict(method=RESUMABLE["method"],  # dropout 0.1: a step's random draws matter
             training={"max_steps": 7, "micro_batch_size": 2, "learning_rate": 2e-3, "warmup_steps": 2,
                       "save_every": 100, "lr_scheduler": "cosine"})  # no evaluation or save before the end


@pytest.fixture
def step_order(monkeypatch):
    """What the loop did, in order: ("launch", epoch, step_in_epoch) and ("settle", steps settled before)."""
    from peftctl.train import loop

    order = []
    launch, settle = loop.forward_backward, loop.settle

    def launching(run, batches, after=None):
        launched = launch(run, batches, after)
        order.append(("launch", launched.epoch, launched.step_in_epoch))
        return launched

    def settling(run, launched):
        order.append(("settle", run.state.step))
        return settle(run, launched)

    monkeypatch.setattr(loop, "forward_backward", launching)
    monkeypatch.setattr(loop, "settle", settling)
    return order


@pytest.mark.parametrize("optimizer_kind", ["fused"], indirect=True)
def test_a_step_launched_ahead_trains_what_step_by_step_trains(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                              optimizer_kind, step_order):
    """With the update queued on the device, the next step is launched before the host reads the last one's loss
    (but not past the first step, the last, or a step that saves or evaluates); the losses, the schedule and the
    weights are those of the step-by-step loop, bit for bit."""
    from peftctl.train import loop

    model = tiny_model("llama")
    ahead = write_recipe(model, "ahead.yaml", **AHEAD, out=tmp_path / "ahead")
    train(load_recipe(str(ahead)), TrainOptions(quiet=True))
    launches = [i for i, event in enumerate(step_order) if event[0] == "launch"]
    assert len(launches) == 7 and len(step_order) == 14
    # step 1 settled at once (the first sign of life), then each next launch before the previous settle, and the
    # last step settled alone
    assert [event[0] for event in step_order[:6]] == ["launch", "settle", "launch", "launch", "settle", "launch"]
    assert step_order[-2:] == [("settle", 5), ("settle", 6)]
    assert [event[1:] for event in step_order if event[0] == "launch"] == [(0, i) for i in range(7)]

    step_order.clear()
    monkeypatch.setattr(loop, "_light_boundary", lambda run: False)
    by_step = write_recipe(model, "by_step.yaml", **AHEAD, out=tmp_path / "by_step")
    train(load_recipe(str(by_step)), TrainOptions(quiet=True))
    assert [event[0] for event in step_order] == ["launch", "settle"] * 7
    assert losses(tmp_path / "ahead") == losses(tmp_path / "by_step")
    lrs = [[r["lr"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "lr" in r]
           for name in ("ahead", "by_step")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 2  # warmup and cosine: the schedule moved, identically
    a, b = adapter_weights(tmp_path / "ahead"), adapter_weights(tmp_path / "by_step")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer_kind", ["fused"], indirect=True)
def test_a_step_launched_ahead_is_timed_alone(tiny_model, write_recipe, tmp_path, monkeypatch, optimizer_kind,
                                               step_order):
    """Step 4 is launched before step 3 settles, and step 4's launch is slow: the slowness is step 4's time, not
    step 3's (read by the host after step 4's launch), and the host reads step 3's values without waiting for
    step 4 (the readout's copy)."""
    from peftctl.train import loop

    launch, slow = loop.forward_backward, 0.4

    def launching(run, batches, after=None):
        launched = launch(run, batches, after)
        if (launched.epoch, launched.step_in_epoch) == (0, 3):
            time.sleep(slow)  # inside the step, after its begin mark
        return launched

    monkeypatch.setattr(loop, "forward_backward", launching)
    recipe = write_recipe(tiny_model("llama"), "ahead.yaml", **AHEAD, out=tmp_path / "ahead")
    train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    assert step_order.index(("settle", 2)) > step_order.index(("launch", 0, 3))  # step 4 went ahead of step 3
    seconds = {r["step"]: r["tokens"] / r["tokens_per_s"]
               for r in read_jsonl(tmp_path / "ahead" / "metrics.jsonl") if "tokens_per_s" in r}
    assert seconds[4] >= slow
    assert seconds[3] < slow and seconds[5] < slow, seconds


@pytest.mark.parametrize("optimizer_kind", ["fused"], indirect=True)
def test_a_stop_while_the_next_step_runs_ahead_resumes_exactly(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                               optimizer_kind):
    """A stop that comes while step 2 settles and logs (a signal, a closed pipe; step 3 launched ahead by then)
    stops the run at step 3, as without the launch ahead, not a step later. Step 4 has been launched, its dropout
    drawn, when step 3 settles: step 3's checkpoint holds the random streams as step 3 left them, and the resumed
    run ends where the uninterrupted one does, bit for bit."""
    from peftctl.errors import TrainingStopped
    from peftctl.train import loop

    model = tiny_model("llama")
    whole = write_recipe(model, "whole.yaml", **AHEAD, out=tmp_path / "whole")
    train(load_recipe(str(whole)), TrainOptions(quiet=True))

    launch, after_step, launches = loop.forward_backward, loop.after_step, []

    def launching(run, batches, after=None):
        launches.append(after is not None)
        return launch(run, batches, after)

    def logging(run, step, stop):
        if run.state.step == 2:
            stop.signal = signal.SIGTERM
        return after_step(run, step, stop)

    monkeypatch.setattr(loop, "forward_backward", launching)
    monkeypatch.setattr(loop, "after_step", logging)
    stopped = write_recipe(model, "stopped.yaml", **AHEAD, out=tmp_path / "stopped")
    with pytest.raises(TrainingStopped, match="at step 3"):
        train(load_recipe(str(stopped)), TrainOptions(quiet=True))
    assert launches == [False, False, True, True]  # step 1 settled alone; step 4 launched when step 3 stopped it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stopped" / "checkpoints")] == [ckpt.name_for(3)]
    monkeypatch.setattr(loop, "after_step", after_step)
    monkeypatch.setattr(loop, "forward_backward", launch)
    train(load_recipe(str(stopped)), TrainOptions(quiet=True, resume="auto"))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "whole")
    a, b = adapter_weights(tmp_path / "stopped"), adapter_weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("optimizer_kind", ["fused"], indirect=True)
def test_out_of_memory_in_a_step_launched_ahead_names_that_step(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                                 optimizer_kind):
    """Step 4 runs out of memory while step 3, launched before it, is not settled yet: the message names step 4."""
    from peftctl.errors import PeftctlError
    from peftctl.train import loop

    launch = loop.forward_backward

    def launching(run, batches, after=None):
        launched = launch(run, batches, after)
        if after is not None and after.step_in_epoch == 2:  # step 4's backward pass, say, ran out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return launched

    monkeypatch.setattr(loop, "forward_backward", launching)
    recipe = write_recipe(tiny_model("llama"), "oom.yaml", **AHEAD, out=tmp_path / "oom")
    with pytest.raises(PeftctlError, match="at step 4"):
        train(load_recipe(str(recipe)), TrainOptions(quiet=True))


def test_nonfinite_skip_drops_the_batch_and_counts_it(tiny_model, write_recipe, tmp_path, monkeypatch,
                                                      optimizer_kind):
    _patched_loss(monkeypatch, {2, 3})
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 4, "on_nonfinite": "skip"})
    train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["nonfinite_skipped"] == 2 and manifest["steps_done"] == 4
    assert all(torch.isfinite(w).all() for w in adapter_weights(tmp_path / "run").values())


def test_nonfinite_skip_stops_after_many_in_a_row(tiny_model, write_recipe, monkeypatch):
    _patched_loss(monkeypatch, set(range(1, 100)))
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 20, "on_nonfinite": "skip"})
    from peftctl.errors import PeftctlError

    with pytest.raises(PeftctlError, match=r"non-finite loss at step 1; stopped"):  # skipped a few, never stepped
        train(load_recipe(str(recipe)), TrainOptions(quiet=True))


def test_out_of_memory_message_and_exit_code(tiny_model, write_recipe, monkeypatch, capsys):
    from peftctl.cli.errors import run_guarded
    from peftctl.train import loss as loss_module

    def build(model, spec, device, **kwargs):
        def oom(m, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return oom, "test"

    monkeypatch.setattr(loss_module, "build_loss", build)
    recipe = write_recipe(tiny_model("llama"), training={"micro_batch_size": 2})
    code = run_guarded(lambda: train(load_recipe(str(recipe)), TrainOptions(quiet=True)))
    err = capsys.readouterr().err
    assert code == 3
    assert "micro_batch_size 2 x max_length 128" in err and "gradient_checkpointing: true" in err


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model, write_recipe, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from peftctl.errors import PeftctlError

    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 6, "save_every": 2})
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    saves = {"n": 0}

    def disk_usage(path):
        saves["n"] += 1
        return real(path) if saves["n"] == 1 else Usage(10**9, 10**9, 1000)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(PeftctlError, match="not enough disk space") as err:
        train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    assert "not enough disk space" in err.value.message and "previous checkpoint is intact" in err.value.hint
    points = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in points] == ["step_000002"]
    ckpt.verify(points[0])


def test_no_token_is_printed_or_written(tiny_model, write_recipe, tmp_path):
    sentinel = "hf_SENTINELTOKEN1234567890abcdef"
    recipe = write_recipe(tiny_model("llama"))
    result = cli("train", str(recipe), "--log-format", "json", env={"HF_TOKEN": sentinel,
                                                                      "HUGGING_FACE_HUB_TOKEN": sentinel})
    assert result.returncode == 0, result.stderr
    assert sentinel not in result.stdout and sentinel not in result.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path


def test_torch_load_is_always_weights_only():
    offenders = []
    for path in (REPO / "peftctl").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}:{number}")
    assert not offenders


def test_yaml_is_only_loaded_safely():
    offenders = []
    for path in (REPO / "peftctl").rglob("*.py"):
        text = path.read_text()
        if "yaml.load(" in text or "yaml.unsafe_load" in text or "yaml.full_load" in text:
            offenders.append(str(path))
    assert not offenders
