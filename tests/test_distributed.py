"""Several processes through torch.distributed on the CPU (gloo): two ranks with DDP train the same adapter as one
process with twice the gradient accumulation; a SIGTERM to the launcher checkpoints every rank; a resume at N=2
continues the same run. The torchrun tests are slow (`python -m pytest -m slow tests/test_distributed.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO, cli, fused_adamw, read_jsonl, run_cli
from peftctl.recipe.loader import load_recipe
from peftctl.train.loop import TrainOptions, train

STEPS = dict(micro_batch_size=2, learning_rate=1e-3, warmup_steps=0, lr_scheduler="constant", seed=0,
             eval_every=1000, save_every=1000)


# The largest difference of adapter weights that still means "the same training": the ranks sum gradients in
# another order than one process does (float32 rounding, different on every CPU); a wrong reduction (an average
# where a sum belongs, a lost micro-batch) moves weights by about the learning rate, 1e-3, in a step.
SAME_TRAINING = 1e-5


def torchrun(recipe, *args: str, program: tuple[str, ...] = ("-m", "peftctl"), **env: str) -> None:
    """`peftctl train RECIPE --quiet ARGS` in two ranks under torchrun (gloo on the CPU); fails the test unless 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *program,
                             "train", str(recipe), "--quiet", *args], capture_output=True, text=True, env=env,
                            cwd=str(REPO), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def two_ranks_against_one(tiny_model, write_recipe, tmp_path, max_steps: int, training: dict | None = None,
                          **torchrun_options) -> None:
    """One process with gradient accumulation 2, then two ranks with 1 under torchrun: the same training."""
    model = tiny_model("llama")
    single = write_recipe(model, name="single.yaml", out=tmp_path / "single",
                          training={**STEPS, "max_steps": max_steps, "gradient_accumulation": 2, **(training or {})})
    train(load_recipe(str(single)), TrainOptions(quiet=True))
    double = write_recipe(model, name="double.yaml", out=tmp_path / "double",
                          training={**STEPS, "max_steps": max_steps, "gradient_accumulation": 1, **(training or {})})
    torchrun(double, **torchrun_options)
    one, two = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                for name in ("single", "double"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < SAME_TRAINING
    losses = [[r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")] for name in ("single", "double")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow  # two processes of torch each, minutes on a 2-core machine
def test_two_ranks_equal_one_process_with_twice_the_accumulation(tiny_model, write_recipe, tmp_path):
    two_ranks_against_one(tiny_model, write_recipe, tmp_path, 4)
    manifest = json.loads((tmp_path / "double" / "run.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed"] == "ddp"
    assert [r["rank"] for r in manifest["memory_per_rank"]] == [0, 1]  # every rank's peak, gathered at the end


@pytest.mark.slow  # two processes of torch each, minutes on a 2-core machine
def test_checkpointed_ranks_recompute_non_reentrant_and_train_what_one_process_trains(tiny_model, write_recipe,
                                                                                      tmp_path):
    """One process recomputes through the reentrant checkpoint; DDP's per-parameter hooks need the non-reentrant
    form, which the ranks take. Both train the same adapter."""
    two_ranks_against_one(tiny_model, write_recipe, tmp_path, 3, training={"gradient_checkpointing": True})
    forms = [json.loads((tmp_path / name / "run.json").read_text())["fast_path"]["activation_checkpointing"]
             for name in ("single", "double")]
    assert forms == ["reentrant", "non_reentrant"]


@pytest.mark.slow  # two processes of torch each, minutes on a 2-core machine
def test_two_ranks_launching_steps_ahead_equal_one_process(tiny_model, write_recipe, tmp_path, monkeypatch):
    """With fused AdamW (a GPU's optimiser; torch has it on the CPU too) the update is queued on the device and
    each rank launches a step before the previous one settles: two ranks still train what one process with
    twice the accumulation trains."""
    from peftctl.train import optim

    monkeypatch.setattr(optim, "build_optimizer", fused_adamw(optim.build_optimizer))
    two_ranks_against_one(tiny_model, write_recipe, tmp_path, 5,
                          program=(str(REPO / "tests" / "fused_adamw_peftctl.py"),),
                          PEFTCTL_TEST_LAUNCHES=str(tmp_path / "launches"))
    for rank in (0, 1):  # step 1 settled alone, steps 3-5 launched ahead
        assert json.loads((tmp_path / f"launches.{rank}").read_text()) == [False, False, True, True, True]


@pytest.mark.slow  # two processes of torch each, minutes on a 2-core machine
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resume_continues(tiny_model, write_recipe, tmp_path):
    model = tiny_model("llama")
    reference = write_recipe(model, name="ref.yaml", out=tmp_path / "ref",
                             training={**STEPS, "max_steps": 8, "gradient_accumulation": 2})
    train(load_recipe(str(reference)), TrainOptions(quiet=True))
    recipe = write_recipe(model, name="ddp.yaml", out=tmp_path / "ddp",
                          training={**STEPS, "max_steps": 8, "gradient_accumulation": 1})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftctl", "train", str(recipe), "--gpus", "2", "--log-format",
                             "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO))
    for line in proc.stdout:
        if json.loads(line).get("step", 0) >= 2:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["steps_done"] < 8
    checkpoint = tmp_path / "ddp" / "checkpoints" / f"step_{manifest['steps_done']:06d}"
    assert len(json.loads((checkpoint / "rng.json").read_text())["ranks"]) == 2

    result = run_cli("train", str(recipe), "--gpus", "2", "--resume", "auto", "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ref = [r["loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]
    got = [r["loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl")]
    assert got == pytest.approx(ref, rel=1e-5)
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < SAME_TRAINING


@pytest.mark.slow  # two processes of torch each, minutes on a 2-core machine
def test_fsdp_shards_and_trains_the_same_adapter(tiny_model, write_recipe, tmp_path):
    """training.distributed: fsdp (FSDP2, every decoder layer sharded): the same adapter as one process, checkpoints
    gathered in full, and a resume continues."""
    model = tiny_model("llama")
    single = write_recipe(model, name="single.yaml", out=tmp_path / "single", dataset={"validation": 0.1},
                          training={**STEPS, "max_steps": 4, "gradient_accumulation": 2, "eval_every": 2})
    train(load_recipe(str(single)), TrainOptions(quiet=True))
    sharded = write_recipe(model, name="fsdp.yaml", out=tmp_path / "fsdp", dataset={"validation": 0.1},
                           training={**STEPS, "max_steps": 4, "gradient_accumulation": 1, "eval_every": 2,
                                     "save_every": 2, "distributed": "fsdp"})
    torchrun(sharded)
    one, two = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
                for name in ("single", "fsdp"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < SAME_TRAINING
    records = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("single", "fsdp")]
    assert [r.get("loss", r.get("eval_loss")) for r in records[0]] == pytest.approx(
        [r.get("loss", r.get("eval_loss")) for r in records[1]], rel=1e-5)
    manifest = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert manifest["distributed"] == "fsdp" and manifest["world_size"] == 2
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    state = load_file(str(checkpoint / "adapter_state.safetensors"))
    assert all(t.shape == one[k.replace(".default", "")].shape for k, t in state.items())  # full, not shards

    # Resume from step 2 (weights re-sharded, optimiser state set through torch.distributed.checkpoint).
    torchrun(sharded, "--resume", str(checkpoint))
    resumed = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert max((one[k] - resumed[k]).abs().max().item() for k in one) < SAME_TRAINING


def test_fsdp_refuses_a_quantised_base(tiny_model, write_recipe):
    result = cli("validate", str(write_recipe(tiny_model("llama"), quantization={"bits": 4},
                                                  training={"distributed": "fsdp"})))
    assert result.returncode == 2 and "FSDP2 is not supported" in result.stderr
