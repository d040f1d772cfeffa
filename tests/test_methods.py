"""Every PEFT method through the same checks, on a tiny Llama-shaped model (grouped-query attention) on the CPU.

One matrix over methods x base precision (full precision, 4-bit NF4, 8-bit). For each cell, one short training
run through the library's `train` (the path `peftctl train` takes) on a task small enough to memorise, then:
- the loss falls (mean of the first steps against mean of the last);
- only the method's own parameters change: every base weight is bit-identical after training, every trainable
  tensor belongs to the adapter and moved;
- the saved adapter, loaded with `methods.runtime.load` onto a freshly loaded base, gives the trained model's logits;
- the trainable count equals a closed form written here, peft's own `get_nb_trainable_parameters` (where peft
  builds the method) and what run.json recorded.
The full matrix is marked slow; one full-precision case per method (and qlora, which is 4-bit by definition) runs
by default. Validation refusals and the LoRA+ learning rates have tests of their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import yaml

from conftest import cli, recipe_dict

# A task to memorise: four examples, each seen every step.
TASK = [
    {"instruction": "Reverse the order of the words.", "input": "river piano planet", "output": "planet piano river"},
    {"instruction": "What is 2 plus 5?", "input": "", "output": "2 plus 5 is 7."},
    {"instruction": "Spell the word with dashes.", "input": "forest", "output": "f-o-r-e-s-t"},
    {"instruction": "Repeat the word 2 times.", "input": "candle", "output": "candle candle"},
]
STEPS = 8
SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)  # tests/conftest's tiny_model defaults

QUANT = {
    "fp": None,
    "4bit": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
    "8bit": {"bits": 8, "compute_dtype": "float32"},
}

# --- closed-form trainable counts, from the model config ---------------------------------------------------


def _shapes(c) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a Llama-style decoder layer."""
    h, hd = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, c.intermediate_size), "up_proj": (h, c.intermediate_size),
            "down_proj": (c.intermediate_size, h)}


def lora_count(targets, r, dora=False):
    def count(c):
        shapes = _shapes(c)
        names = list(shapes) if targets == "all-linear" else targets
        per_layer = sum(r * (shapes[n][0] + shapes[n][1]) + (shapes[n][1] if dora else 0) for n in names)
        return c.num_hidden_layers * per_layer
    return count


def prefix_count(virtual, projection_hidden=None):
    """Each virtual token is a key and a value per layer, sized head_dim x kv_heads (grouped-query attention)."""
    def count(c):
        token = c.head_dim * c.num_key_value_heads
        out = c.num_hidden_layers * 2 * token
        if projection_hidden is None:
            return virtual * out
        e = projection_hidden  # embedding -> Linear(token, e) -> tanh -> Linear(e, layers x 2 x token)
        return virtual * token + (token * e + e) + (e * out + out)
    return count


def prompt_count(virtual):
    return lambda c: virtual * c.hidden_size


def p_tuning_count(virtual, encoder, e):
    def count(c):
        h = c.hidden_size
        if encoder == "mlp":  # Linear(h, e) -> Linear(e, e) -> Linear(e, h)
            return virtual * h + (h * e + e) + (e * e + e) + (e * h + h)
        # a 2-layer bidirectional LSTM (input h, then 2e), each direction 4 gates with two biases, then
        # Linear(2e, 2e) -> Linear(2e, h)
        lstm = 2 * (4 * e * (h + e) + 8 * e) + 2 * (4 * e * (2 * e + e) + 8 * e)
        return virtual * h + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
    return count


def ia3_count(targets, feedforward):
    """One scale per output feature; per input feature for feed-forward targets."""
    def count(c):
        shapes = _shapes(c)
        return c.num_hidden_layers * sum(shapes[n][0] if n in feedforward else shapes[n][1] for n in targets)
    return count


def bottleneck_count(per_layer, width=None, reduction_factor=None):
    """Per adapter: down (h x m + m) and up (m x h + h) = 2hm + m + h."""
    def count(c):
        h = c.hidden_size
        m = width or h // reduction_factor
        return c.num_hidden_layers * per_layer * (2 * h * m + m + h)
    return count


# --- the cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: dict
    learning_rate: float
    count: Callable  # config -> trainable parameters
    default: bool = False  # in the default (fast) slice, at full precision
    precisions: tuple[str, ...] = ("fp", "4bit", "8bit")


LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
CASES = {
    "lora": Case(LORA, 1e-2, lora_count(["q_proj", "v_proj"], 8), default=True),
    "lora-dora": Case({**LORA, "use_dora": True}, 1e-2, lora_count(["q_proj", "v_proj"], 8, dora=True)),
    "lora-rslora": Case({**LORA, "use_rslora": True}, 1e-2, lora_count(["q_proj", "v_proj"], 8)),
    "lora-loraplus": Case({**LORA, "loraplus_lr_ratio": 4}, 5e-3, lora_count(["q_proj", "v_proj"], 8)),
    # qlora is LoRA on a 4-bit base by definition; its quantization section is left to the recipe rules to fill.
    "qlora": Case({**LORA, "name": "qlora", "targets": "all-linear"}, 1e-2, lora_count("all-linear", 8),
                  default=True, precisions=("4bit",)),
    "prefix": Case({"name": "prefix_tuning", "num_virtual_tokens": 8}, 1e-1, prefix_count(8), default=True),
    "prefix-projection": Case({"name": "prefix_tuning", "num_virtual_tokens": 8, "projection": True,
                               "projection_hidden_size": 32}, 3e-2, prefix_count(8, 32)),
    "prompt": Case({"name": "prompt_tuning", "num_virtual_tokens": 8}, 1e-1, prompt_count(8), default=True),
    "prompt-text": Case({"name": "prompt_tuning", "num_virtual_tokens": 8,
                         "prompt_init_text": "Answer the instruction."}, 1e-1, prompt_count(8)),
    "p_tuning-mlp": Case({"name": "p_tuning", "num_virtual_tokens": 8, "encoder_type": "mlp",
                          "encoder_hidden_size": 32}, 1e-2, p_tuning_count(8, "mlp", 32), default=True),
    "p_tuning-lstm": Case({"name": "p_tuning", "num_virtual_tokens": 8, "encoder_type": "lstm",
                           "encoder_hidden_size": 32}, 1e-2, p_tuning_count(8, "lstm", 32)),
    "ia3": Case({"name": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward_targets": ["down_proj"]},
                5e-2, ia3_count(["k_proj", "v_proj", "down_proj"], ["down_proj"]), default=True),
    "adapter-houlsby": Case({"name": "adapter", "placement": "houlsby", "bottleneck": 16}, 1e-2,
                            bottleneck_count(2, width=16), default=True),
    "adapter-pfeiffer": Case({"name": "adapter", "placement": "pfeiffer", "reduction_factor": 8}, 1e-2,
                             bottleneck_count(1, reduction_factor=8)),
}
ADAPTER_PARTS = ("lora_", "ia3_", "prompt_encoder", "bottleneck_adapters")  # names of adapter tensors


def _matrix():
    params = []
    for case_id, case in CASES.items():
        for precision in case.precisions:
            fast = case.default and (precision == "fp" or case_id == "qlora")
            params.append(pytest.param(case_id, precision, id=f"{case_id}-{precision}",
                                       marks=() if fast else pytest.mark.slow))
    return params


# --- helpers -----------------------------------------------------------------------------------------------


def _write_task_recipe(tmp_path, model_dir, case: Case, precision: str, **training):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TASK))
    sections = {"method": {"_replace": True, **case.method}}
    if QUANT.get(precision) and case.method["name"] != "qlora":  # qlora: the recipe rules fill it
        sections["quantization"] = dict(QUANT[precision])
    recipe = recipe_dict(model_dir, data=data, out=tmp_path / "run", **sections)
    recipe["dataset"].update(max_length=64)
    recipe["training"].update(max_steps=STEPS, micro_batch_size=4, gradient_accumulation=1, lr_scheduler="constant",
                              learning_rate=case.learning_rate)
    recipe["training"].update(training)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _train_captured(recipe_path, monkeypatch):
    """Run the library's `train` as `peftctl train` does, keeping the model and the base weights before training."""
    from peftctl.methods import runtime
    from peftctl.recipe.loader import load_recipe
    from peftctl.train import optim
    from peftctl.train.loop import TrainOptions, train

    seen: dict = {}
    real_attach, real_optimizer = runtime.attach, optim.build_optimizer

    def attach(model, section, context):
        seen["base"] = [(name, p, p.detach().clone()) for name, p in model.named_parameters()]
        out = real_attach(model, section, context)
        seen["model"] = out
        seen["initial"] = {name: p.detach().clone() for name, p in out.named_parameters() if p.requires_grad}
        return out

    def build_optimizer(model, recipe, device):
        seen["optimizer"] = real_optimizer(model, recipe, device)
        return seen["optimizer"]

    monkeypatch.setattr(runtime, "attach", attach)
    monkeypatch.setattr(optim, "build_optimizer", build_optimizer)
    loaded = load_recipe(str(recipe_path))
    seen["result"] = train(loaded, TrainOptions(quiet=True))
    seen["loaded"] = loaded
    return seen


def _losses(run_dir) -> list[float]:
    from conftest import read_jsonl

    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _probe_batch(tokenizer):
    import torch

    ids = tokenizer("Reverse the order of the words. planet piano river")["input_ids"]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "use_cache": False}


# --- the matrix --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id,precision", _matrix())
def test_method(case_id, precision, tiny_model, tmp_path, monkeypatch):
    import torch
    from transformers import AutoConfig

    from peftctl.methods import runtime
    from peftctl.methods.registry import METHODS
    from peftctl.model import load_model, load_tokenizer
    from peftctl.params import count_parameters

    case = CASES[case_id]
    spec = METHODS[case.method["name"]]
    if precision != "fp":
        assert spec.works_on_4bit, f"{spec.name} trains on a quantised base: the registry must not refuse it"
    model_dir = tiny_model("llama")
    seen = _train_captured(_write_task_recipe(tmp_path, model_dir, case, precision), monkeypatch)
    model, run_dir, recipe = seen["model"], tmp_path / "run", seen["loaded"].recipe
    if spec.name == "qlora":  # filled by the recipe rules: 4-bit NF4, double quantisation, bfloat16 compute
        assert (recipe.quantization.bits, recipe.quantization.quant_type) == (4, "nf4")

    # It learns: the memorised task's loss falls.
    losses = _losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.9 * first, f"loss did not fall: {losses}"

    # Only its own parameters change.
    changed_base = [name for name, p, before in seen["base"] if not torch.equal(p.detach(), before)]
    assert not changed_base, f"base weights changed: {changed_base[:5]}"
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == seen["initial"].keys()
    assert all(any(part in name for part in ADAPTER_PARTS) for name in trainable), list(trainable)
    unmoved = [name for name, p in trainable.items() if torch.equal(p.detach(), seen["initial"][name])]
    assert not unmoved, f"trainable tensors that did not learn: {unmoved}"

    # Its count: the closed form, peft's own, and run.json agree.
    config = AutoConfig.from_pretrained(model_dir)
    counts = count_parameters(model)
    assert counts.trainable == case.count(config)
    if spec.peft_type:
        assert model.get_nb_trainable_parameters() == (counts.trainable, counts.total)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["params"]["trainable"] == counts.trainable and manifest["params"]["total"] == counts.total
    assert manifest["loraplus_lr_ratio"] == case.method.get("loraplus_lr_ratio")

    # Its saved adapter reloads, onto a freshly loaded base, to the trained model's logits.
    adapter_dir = run_dir / "adapter"
    expected_files = (["bottleneck_config.json", "bottleneck_adapter.safetensors"] if spec.name == "adapter"
                      else ["adapter_config.json", "adapter_model.safetensors"])
    assert all((adapter_dir / f).is_file() for f in expected_files)
    batch = _probe_batch(load_tokenizer(recipe.model))
    reloaded = runtime.load(load_model(recipe, torch.device("cpu")), adapter_dir)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        trained_logits, reloaded_logits = model(**batch).logits, reloaded(**batch).logits
    assert trained_logits.shape == reloaded_logits.shape
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in reloaded.parameters())


# --- LoRA+ -------------------------------------------------------------------------------------------------


def test_loraplus_learning_rates(tiny_model, tmp_path, monkeypatch):
    """Every lora_B at ratio x lr; lora_A and DoRA magnitudes at lr (magnitudes without weight decay); the ratio is
    recorded in run.json and beside the adapter, since nothing in peft's saved adapter shows it."""
    case = dataclasses.replace(CASES["lora-dora"], method={**CASES["lora-dora"].method, "loraplus_lr_ratio": 16})
    path = _write_task_recipe(tmp_path, tiny_model("llama"), case, "fp", max_steps=1, weight_decay=0.1)
    seen = _train_captured(path, monkeypatch)
    lr = case.learning_rate
    group_of = {id(p): g for g in seen["optimizer"].param_groups for p in g["params"]}
    kinds = {"lora_B": 0, "lora_A": 0, "magnitude": 0}
    for name, p in seen["model"].named_parameters():
        if not p.requires_grad:
            continue
        group = group_of[id(p)]
        if ".lora_B." in name:
            kinds["lora_B"] += 1
            assert group["initial_lr"] == pytest.approx(16 * lr) and group["weight_decay"] == 0.1, name
        elif ".lora_A." in name:
            kinds["lora_A"] += 1
            assert group["initial_lr"] == pytest.approx(lr) and group["weight_decay"] == 0.1, name
        else:
            assert "lora_magnitude_vector" in name and p.ndim == 1, name
            kinds["magnitude"] += 1
            assert group["initial_lr"] == pytest.approx(lr) and group["weight_decay"] == 0.0, name
    assert kinds == {"lora_B": 4, "lora_A": 4, "magnitude": 4}  # q_proj, v_proj x 2 layers
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["loraplus_lr_ratio"] == 16
    assert json.loads((run_dir / "adapter" / "peftctl_adapter.json").read_text())["loraplus_lr_ratio"] == 16


def test_parameter_groups_without_loraplus(tiny_model):
    """No ratio: one rate for everything; 1-D parameters (DoRA magnitudes) still without weight decay."""
    from transformers import AutoConfig

    from peftctl.methods.ia3 import Ia3Section
    from peftctl.methods.lora import LoraSection
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.runtime import attach
    from peftctl.params import meta_model
    from peftctl.train.optim import parameter_groups

    model = meta_model(AutoConfig.from_pretrained(tiny_model("llama")))
    model = attach(model, LoraSection(**{**LORA, "use_dora": True}), AttachContext(tokenizer_path=""))
    groups = {g["name"]: g for g in parameter_groups(model, 1e-3, 0.1, None)}
    assert set(groups) == {"base", "no_decay"}
    assert all(g["lr"] == 1e-3 for g in groups.values()) and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and len(groups["no_decay"]["params"]) == 4

    # IA3's scales start at 1 and multiply activations: no decay towards 0 (they are (out, 1) or (1, in) tensors)
    model = attach(meta_model(AutoConfig.from_pretrained(tiny_model("llama"))), Ia3Section(name="ia3"),
                   AttachContext(tokenizer_path=""))
    groups = {g["name"]: g for g in parameter_groups(model, 1e-3, 0.1, None)}
    assert set(groups) == {"no_decay"} and len(groups["no_decay"]["params"]) == 6


# --- counts on other architectures (meta models: no weights) -----------------------------------------------

ARCH_CONFIGS = {
    # GPT-2: no grouped-query attention, blocks named attn / mlp
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=256),
    # Qwen2: grouped-query attention, tied embeddings
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256),
    # Gemma 2: head_dim set apart from hidden / heads (8, not 16), post-attention norms
    "gemma2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=128, vocab_size=256),
}


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
@pytest.mark.parametrize("method", [
    {"name": "prefix_tuning", "num_virtual_tokens": 5},
    {"name": "prompt_tuning", "num_virtual_tokens": 5},
    {"name": "adapter", "placement": "houlsby", "bottleneck": 8},
], ids=["prefix", "prompt", "houlsby"])
def test_counts_on_other_architectures(arch, method):
    from transformers import AutoConfig

    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.registry import METHODS
    from peftctl.params import count_parameters, meta_model

    config = AutoConfig.for_model(arch, **ARCH_CONFIGS[arch])
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv_width = head_dim * getattr(config, "num_key_value_heads", config.num_attention_heads)
    expected = {"prefix_tuning": 5 * layers * 2 * kv_width, "prompt_tuning": 5 * h,
                "adapter": layers * 2 * (2 * h * 8 + 8 + h)}[method["name"]]
    section = METHODS[method["name"]].section(**method)
    model = runtime.attach(meta_model(config), section, AttachContext(tokenizer_path=""))
    counts = count_parameters(model)
    assert counts.trainable == expected
    if METHODS[method["name"]].peft_type:
        assert model.get_nb_trainable_parameters() == (counts.trainable, counts.total)


# --- validation refuses what cannot work -------------------------------------------------------------------

HUB_MODEL = "meta-llama/Meta-Llama-3-8B"  # validate never loads it


def test_validate_refuses_incompatible_combinations(write_recipe):
    """Each refused at validation, exit code 2, with the reason."""
    refused = {
        "prefix-checkpointing.yaml": (dict(method={"_replace": True, "name": "prefix_tuning"},
                                           training={"gradient_checkpointing": True}),
                                      "prefix_tuning cannot use gradient checkpointing (peft's prefix tuning passes"),
        "prompt-packing.yaml": (dict(method={"_replace": True, "name": "prompt_tuning"}, dataset={"packing": True}),
                                "prompt_tuning cannot pack (the virtual tokens are prepended to a whole row"),
        "p-tuning-packing.yaml": (dict(method={"_replace": True, "name": "p_tuning"}, dataset={"packing": True}),
                                  "p_tuning cannot pack"),
        "qlora-8bit.yaml": (dict(method={**LORA, "name": "qlora"}, quantization={"bits": 8}),
                            "qlora is LoRA on a 4-bit base"),
        "adapter-both-sizes.yaml": (dict(method={"_replace": True, "name": "adapter", "bottleneck": 16,
                                                 "reduction_factor": 8}),
                                    "give bottleneck or reduction_factor, not both"),
        "ia3-stray-feedforward.yaml": (dict(method={"_replace": True, "name": "ia3", "targets": ["k_proj"],
                                                    "feedforward_targets": ["down_proj"]}),
                                       "down_proj not in targets"),
    }
    paths = [str(write_recipe(HUB_MODEL, name=name, **sections)) for name, (sections, _) in refused.items()]
    result = cli("validate", "--json", *paths)
    assert result.returncode == 2, result.stderr
    reports = json.loads(result.stdout)
    assert [r["valid"] for r in reports] == [False] * len(refused)
    for report, (name, (_, reason)) in zip(reports, refused.items()):
        messages = " ".join(e["message"] for e in report["errors"])
        assert reason in messages, f"{name}: {messages}"


def test_validate_accepts_every_method_on_a_4bit_base(write_recipe):
    """Every method trains on a 4-bit base (the slow matrix shows it), so validation accepts each one there."""
    from peftctl.methods.registry import METHODS

    paths = [str(write_recipe(HUB_MODEL, name=f"{case_id}.yaml", method={"_replace": True, **case.method},
                              quantization={"bits": 4}))
             for case_id, case in CASES.items()]
    result = cli("validate", "--json", *paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(spec.works_on_4bit for spec in METHODS.values())


def test_cannot_4bit_is_refused_at_validation(write_recipe, monkeypatch):
    """The mechanism for a method that cannot train on a quantised base: exit 2 with the registry's reason."""
    from peftctl.errors import EXIT_INVALID, RecipeError
    from peftctl.methods import registry
    from peftctl.recipe.loader import load_recipe

    reason = "its scaling vectors would multiply packed 4-bit storage"
    monkeypatch.setitem(registry.METHODS, "ia3", dataclasses.replace(registry.METHODS["ia3"], cannot_4bit=reason))
    path = write_recipe(HUB_MODEL, method={"_replace": True, "name": "ia3"}, quantization={"bits": 4})
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert err.value.exit_code == EXIT_INVALID
    assert f"ia3 cannot train on a quantised base: {reason}" in str(err.value.problems[0].message)


# --- loading adapters that do not fit ----------------------------------------------------------------------


def _tiny_base(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_bottleneck_adapter_refuses_what_does_not_fit(tiny_model, tmp_path):
    from peftctl.errors import InvalidInput
    from peftctl.methods import runtime
    from peftctl.methods.bottleneck import CONFIG_FILE, WEIGHTS_FILE, AdapterSection
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.registry import METHODS

    model_dir = tiny_model("llama")
    saved = tmp_path / "adapter"
    model = runtime.attach(_tiny_base(model_dir), AdapterSection(name="adapter", placement="pfeiffer",
                                                                  bottleneck=16), AttachContext(tokenizer_path=""))
    runtime.save(model, METHODS["adapter"], saved)
    assert runtime.adapter_kind(saved)[0] == "adapter"
    config = json.loads((saved / CONFIG_FILE).read_text())

    for change, message in [({"placement": "houlsby"}, "missing"), ({"width": 8}, "does not fit")]:
        (saved / CONFIG_FILE).write_text(json.dumps({**config, **change}))
        with pytest.raises(InvalidInput, match=message):
            runtime.load(_tiny_base(model_dir), saved)
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    runtime.load(_tiny_base(model_dir), saved)  # the original loads

    (saved / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes()[:100])
    base = _tiny_base(model_dir)
    with pytest.raises(InvalidInput, match="damaged"):
        runtime.load(base, saved)
    assert not hasattr(base, "bottleneck_adapters")  # nothing attached to a base the load refused


@pytest.mark.parametrize("method", [{"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
                                    {"name": "prefix_tuning", "num_virtual_tokens": 4, "projection": True}],
                         ids=["p_tuning", "prefix-projection"])
def test_encoder_adapters_serve_but_cannot_continue_training(method, tiny_model, tmp_path):
    """peft saves the virtual tokens these encoders produced, not the encoders: loading to serve works, loading
    to train more is refused (a run continues from its checkpoint instead)."""
    from peftctl.errors import InvalidInput
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.registry import METHODS

    model_dir = tiny_model("llama")
    spec = METHODS[method["name"]]
    model = runtime.attach(_tiny_base(model_dir), spec.section(**method), AttachContext(tokenizer_path=""))
    runtime.save(model, spec, tmp_path / "adapter")
    with pytest.raises(InvalidInput, match="training cannot continue from it"):
        runtime.load(_tiny_base(model_dir), tmp_path / "adapter", trainable=True)
    runtime.load(_tiny_base(model_dir), tmp_path / "adapter")


def test_saved_adapter_config_names_the_recipes_base_and_sorts_its_targets(tiny_model, tmp_path):
    """Reproducible files: the same training writes the same adapter_config.json (peft writes target_modules from a
    set), and the base is named as the recipe named it -- a hub id, not the folder its weights were read from."""
    from peftctl.methods import runtime
    from peftctl.methods.lora import LoraSection
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.registry import METHODS

    targets = ["v_proj", "up_proj", "q_proj", "o_proj", "k_proj", "gate_proj", "down_proj"]
    model = runtime.attach(_tiny_base(tiny_model("llama")), LoraSection(**{**LORA, "targets": targets}),
                           AttachContext(tokenizer_path="example-org/tiny-llama", tokenizer_revision="abc123"))
    runtime.save(model, METHODS["lora"], tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(targets)
    assert config["base_model_name_or_path"] == "example-org/tiny-llama" and config["revision"] == "abc123"
