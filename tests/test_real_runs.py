"""What real runs need: the best checkpoint and early stopping, continuing from an adapter, trackers that are
opt-in, optimiser choices, and a serving check at the end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, read_jsonl
from peftctl.errors import InvalidInput
from peftctl.recipe.loader import load_recipe
from peftctl.train import checkpoint as ckpt, loop
from peftctl.train.loop import TrainOptions, train

EVALUATED = dict(dataset={"validation": 0.2}, training={"max_steps": 10, "eval_every": 2, "save_every": 100,
                                                        "keep_checkpoints": 1})


def test_keep_best_and_patience(tiny_model, write_recipe, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7])  # best at the second evaluation (step 4), then no improvement
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: next(losses))
    training = {**EVALUATED["training"], "keep_best": True, "patience": 2}
    recipe = write_recipe(tiny_model("llama"), dataset=EVALUATED["dataset"], training=training)
    result = train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    run = tmp_path / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stopped_early"] is True and manifest["steps_done"] == 8  # evaluations at 2, 4, 6, 8
    assert manifest["best"] == {"step": 4, "eval_loss": 2.0} and manifest["adapter_step"] == 4
    kept = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert "step_000004" in kept
    best = load_file(str(run / "checkpoints" / "step_000004" / "adapter_state.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for name, tensor in best.items():
        saved = name.replace(".default.weight", ".weight")
        assert torch.equal(adapter[saved], tensor), name
    assert result.steps == 8


def test_keep_best_needs_validation_data(tiny_model, write_recipe):
    result = cli("validate", str(write_recipe(tiny_model("llama"), training={"keep_best": True})))
    assert result.returncode == 2 and "training.keep_best: needs validation data" in result.stderr


def test_init_from_continues_from_the_adapters_weights(tiny_model, trained, write_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftctl.data.prepare import prepare
    from peftctl.model import load_tokenizer
    from peftctl.train.loss import loss_sum

    model_dir = tiny_model("llama")
    adapter = trained("first", model_dir) / "adapter"  # read only: the session's shared run
    second = write_recipe(model_dir, name="second.yaml", out=tmp_path / "second",
                          method={"init_from": str(adapter)}, training={"max_steps": 1, "seed": 7})
    train(load_recipe(str(second)), TrainOptions(quiet=True))
    logged = read_jsonl(tmp_path / "second" / "metrics.jsonl")[0]["loss"]

    recipe = load_recipe(str(second)).recipe
    tok = load_tokenizer(recipe.model)
    data = prepare(recipe.dataset, tok, seed=7, pad_id=tok.pad_token_id)
    rows = data.epoch_order(0, 7)[:2]
    batch = data.micro_batches(data.train, rows, 2)[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    with torch.no_grad():
        expected = (loss_sum(model, batch) / batch.n_trained).item()
    assert logged == pytest.approx(expected, rel=1e-5)


def test_init_from_refuses_an_adapter_that_does_not_fit(tiny_model, trained, write_recipe, tmp_path):
    model_dir = tiny_model("llama")
    adapter = str(trained("first", model_dir) / "adapter")  # a lora adapter of r 8
    other = write_recipe(model_dir, name="other.yaml", out=tmp_path / "other",
                         method={"init_from": adapter, "r": 4})
    with pytest.raises(InvalidInput) as err:
        train(load_recipe(str(other)), TrainOptions(quiet=True))
    assert "method.r is 4, the adapter's is 8" in err.value.message
    ia3 = write_recipe(model_dir, name="ia3.yaml", out=tmp_path / "ia3",
                       method={"name": "ia3", "init_from": adapter, "_replace": True})
    with pytest.raises(InvalidInput) as err:
        train(load_recipe(str(ia3)), TrainOptions(quiet=True))
    assert "holds a lora adapter; this recipe trains ia3" in err.value.message


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "tensorboard"])
def test_missing_tracker_extra_is_exit_2_with_the_pip_command(tiny_model, write_recipe, tmp_path, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    result = cli("train", str(write_recipe(tiny_model("llama"), output={"trackers": [tracker]})))
    assert result.returncode == 2 and f"pip install 'peftctl[{tracker}]'" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed


def test_8bit_optimisers_need_a_gpu(tiny_model, write_recipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("train", str(write_recipe(tiny_model("llama"), training={"optimizer": "adamw_8bit"})))
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_serving_check_at_the_end(tiny_model, write_recipe, tmp_path):
    recipe = write_recipe(tiny_model("llama"), method={"r": 32, "alpha": 64})
    train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    serving = json.loads((tmp_path / "run" / "run.json").read_text())["serving"]
    assert serving["vllm_lora_ready"] is True and serving["vllm_max_lora_rank"] == 32
    assert "--max-lora-rank 32" in serving["notes"][0]


def test_modules_to_save_trains_the_embeddings_and_counts_their_size(tiny_model, write_recipe, tmp_path):
    from transformers import AutoConfig

    from peftctl.params import count_for_recipe

    model_dir = tiny_model("llama")
    plain = load_recipe(str(write_recipe(model_dir, name="plain.yaml"))).recipe
    saved = load_recipe(str(write_recipe(model_dir, name="saved.yaml",
                                         method={"modules_to_save": ["embed_tokens", "lm_head"]}))).recipe
    config = AutoConfig.from_pretrained(model_dir)
    extra = count_for_recipe(saved).count.trainable - count_for_recipe(plain).count.trainable
    assert extra == 2 * config.vocab_size * config.hidden_size  # a trainable copy of each (llama: not tied)
    train(load_recipe(str(write_recipe(model_dir, name="saved.yaml",
                                       method={"modules_to_save": ["embed_tokens", "lm_head"]}))),
          TrainOptions(quiet=True))
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in weights) and any("lm_head" in k for k in weights)
    serving = json.loads((tmp_path / "run" / "run.json").read_text())["serving"]
    assert any("modules_to_save" in note for note in serving["notes"])


def test_micro_batches_sized_by_a_token_budget(tiny_model, write_recipe, tmp_path):
    from peftctl.data.prepare import prepare
    from peftctl.model import load_tokenizer

    recipe_path = write_recipe(tiny_model("llama"), dataset={"packing": False, "max_length": 128},
                               training={"micro_batch_tokens": 256, "max_steps": 3, "gradient_accumulation": 2,
                                         "_replace": False})
    text = recipe_path.read_text().replace("  micro_batch_size: 2\n", "")
    recipe_path.write_text(text)
    loaded = load_recipe(str(recipe_path))
    recipe = loaded.recipe
    tok = load_tokenizer(recipe.model)
    data = prepare(recipe.dataset, tok, seed=0, pad_id=tok.pad_token_id)
    plan = data.step_schedule(recipe.training)
    lengths = data.train.row_counts()[1]
    for step in plan.steps(0):
        assert len(step) <= 2
        for micro in step:
            assert max(lengths[r] for r in micro) * len(micro) <= 256
            assert len(micro) >= 1
    assert sorted(r for step in plan.steps(0) for micro in step for r in micro) == list(range(len(data.train.rows)))
    train(loaded, TrainOptions(quiet=True))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps_done"] == 3


def test_token_budget_rules(tiny_model, write_recipe):
    both = cli("validate", str(write_recipe(tiny_model("llama"), training={"micro_batch_tokens": 512})))
    assert both.returncode == 2 and "not both" in both.stderr  # the recipe also sets micro_batch_size
    path = write_recipe(tiny_model("llama"), name="small.yaml", training={"micro_batch_tokens": 64})
    path.write_text(path.read_text().replace("  micro_batch_size: 2\n", ""))
    small = cli("validate", str(path))
    assert small.returncode == 2 and "less than dataset.max_length (128)" in small.stderr


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_trackers_record_the_run_when_installed(tiny_model, write_recipe, tmp_path, tracker, monkeypatch):
    """With the extra installed (not in the default test extras): metrics reach the tracker, locally only --
    MLflow's file store, W&B's offline mode -- with the recipe's project, run name and tags."""
    pytest.importorskip(tracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recipe = write_recipe(tiny_model("llama"), output={"trackers": [tracker], "project": "peftctl-test",
                                                       "run_name": "tiny", "tags": ["ci"]})
    train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    if tracker == "mlflow":
        import mlflow

        runs = mlflow.search_runs(experiment_names=["peftctl-test"])
        assert len(runs) == 1 and runs.iloc[0]["tags.mlflow.runName"] == "tiny"
        assert runs.iloc[0]["status"] == "FINISHED" and runs.iloc[0]["metrics.loss"] > 0
    else:
        logs = list((tmp_path / "run").rglob("*.wandb"))
        assert logs, "no offline W&B run was written"
