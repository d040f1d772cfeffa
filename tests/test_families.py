"""The support matrix (README's table): every model family users bring, from one default-style recipe.

For each family a tiny random model is built from transformers' own config (scripts/tiny_families.py) and trained
in-process with `targets: all-linear`, the default dropout and `packing: auto`, on a task small enough to memorise:
- count-params (meta model, config alone) equals peft's own count on the trained model and run.json's;
- the loss falls; packing is on wherever the model keeps packed examples apart (off, with a note, for gpt-oss);
- stock transformers + peft reload the saved adapter to the trained model's logits;
- (slow) merge verifies, and generate runs on the adapter and on the merged model.
MoE families also show their expert rows by module path. One cell per family runs by default; merge and generate
under `-m slow`.
"""

from __future__ import annotations

import json
import math

import pytest
import transformers
import yaml
from packaging.version import Version

from conftest import read_jsonl, recipe_dict
from tiny_families import FAMILIES, MOE_FAMILIES, make_family_model

TASK = [
    {"instruction": "Reverse the order of the words.", "input": "river piano planet", "output": "planet piano river"},
    {"instruction": "What is 2 plus 5?", "input": "", "output": "2 plus 5 is 7."},
    {"instruction": "Spell the word with dashes.", "input": "forest", "output": "f-o-r-e-s-t"},
    {"instruction": "Repeat the word 2 times.", "input": "candle", "output": "candle candle"},
]
NO_PACKING = {"gpt_oss": "sinks and sliding windows ignore per-example positions",
              "qwen3_next": "linear attention's state runs across packed examples"}
OLD_TRANSFORMERS = Version(transformers.__version__) < Version("5.24")
if OLD_TRANSFORMERS:  # seen on 5.17 (the oldest CI stage); 5.24 passes position_ids to falcon's mask
    NO_PACKING["falcon"] = "transformers < 5.24: falcon's attention mask ignores position_ids"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(family) -> dict(model_dir, run_dir, model, loaded, recipe_path), trained once per module."""
    from peftctl.methods import runtime
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    root = tmp_path_factory.mktemp("families")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TASK))
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family in done:
            return done[family]
        model_dir = make_family_model(family, root / family)
        recipe = recipe_dict(model_dir, data=data, out=root / f"{family}-run",
                             method={"_replace": True, "name": "lora", "r": 8, "alpha": 16,
                                     "targets": "all-linear"})
        recipe["dataset"].update(max_length=256)  # rows of several examples: packing, and its isolation check
        recipe["dataset"].pop("packing", None)  # the default: auto
        recipe["training"].update(max_steps=8, micro_batch_size=4, lr_scheduler="constant", learning_rate=1e-2)
        path = root / f"{family}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        seen = {}
        real_attach = runtime.attach

        def attach(model, section, context):
            seen["model"] = real_attach(model, section, context)
            return seen["model"]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runtime, "attach", attach)
            loaded = load_recipe(str(path))
            train(loaded, TrainOptions(quiet=True))
        done[family] = dict(model_dir=model_dir, run_dir=root / f"{family}-run", model=seen["model"],
                            loaded=loaded, recipe_path=path)
        return done[family]

    return get


def _probe(model_dir):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer("Reverse the order of the words. planet piano river")["input_ids"]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "use_cache": False}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_counts_and_reloads(family, runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftctl.params import count_for_recipe

    run = runs(family)
    model, run_dir = run["model"], run["run_dir"]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed", manifest.get("status")

    # count-params from the config alone = peft's count on the built model = run.json
    counted = count_for_recipe(run["loaded"].recipe)
    trainable, total = model.get_nb_trainable_parameters()
    assert (counted.count.trainable, counted.count.total) == (trainable, total)
    assert manifest["params"]["trainable"] == trainable
    if family in MOE_FAMILIES:
        rows = {row["module"] for row in counted.modules}
        assert {"experts.gate_up_proj", "experts.down_proj"} <= rows, rows
        assert not any("base_layer" in r or r.endswith(("gate", "router")) for r in rows), rows  # router frozen

    # it learns, packed wherever the model keeps packed examples apart
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.95 * sum(losses[:2]) / 2, losses  # cohere scales its logits by 1/16: slower
    assert manifest["data"]["packed"] is (family not in NO_PACKING)
    if family not in NO_PACKING:  # and packing meant rows of several examples, so the isolation check ran
        assert manifest["data"]["rows"] < manifest["data"]["train"]["examples"]

    # stock transformers + peft reload the adapter to the trained model's logits
    base = AutoModelForCausalLM.from_pretrained(str(run["model_dir"]), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    batch = _probe(run["model_dir"])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        want, got = model(**batch).logits, reloaded(**batch).logits
    assert got.argmax(-1).equal(want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merges_and_verifies(family, runs, tmp_path):
    from peftctl.merge import merge_adapter

    run = runs(family)
    merge_adapter(run["run_dir"] / "adapter", tmp_path / "merged", base=str(run["model_dir"]))
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_generates(family, runs):
    from peftctl.cli.generate import generate_one, generation_config, load_for_generation

    run = runs(family)
    model, tokenizer = load_for_generation(str(run["run_dir"]))
    text = generate_one(model, tokenizer, "The cat", chat=False, config=generation_config(model, tokenizer, 6, 0.0))
    assert isinstance(text, str)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= 12


def test_qlora_on_moe_quantises_linear_layers_and_says_the_experts_stay(runs, tmp_path):
    """bitsandbytes quantises Linear layers only: on a 4-bit base the routed experts stay at model.dtype, the
    adapter trains on both, and a note says so."""
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model
    from peftctl.recipe.loader import load_recipe

    run = runs("mixtral")
    recipe = yaml.safe_load(run["recipe_path"].read_text())
    recipe["method"]["name"] = "qlora"
    recipe["quantization"] = {"bits": 4, "compute_dtype": "float32"}
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    import torch

    loaded = load_recipe(str(path))
    model = load_model(loaded.recipe, torch.device("cpu"))
    model = runtime.attach(model, loaded.recipe.method, AttachContext(tokenizer_path=""))
    kinds = {type(p).__name__ for n, p in model.named_parameters() if "q_proj.base_layer" in n}
    assert "Params4bit" in kinds
    assert any("routed experts" in note and "float32" in note for note in model.peftctl_notes), model.peftctl_notes
    batch = _probe(run["model_dir"])
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [n for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert any("experts" in n for n in grads) and any("q_proj" in n for n in grads)
