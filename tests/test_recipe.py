"""The recipe layer: schema, safe YAML with positions, rules, --set, paths (no torch needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from peftctl.errors import RecipeError
from peftctl.recipe.loader import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

GOOD = """\
model:
  name: meta-llama/Meta-Llama-3-8B
method:
  name: lora
  r: 16
dataset:
  path: yahma/alpaca-cleaned
training:
  learning_rate: 1.0e-4
output:
  dir: runs/x
"""


def problems_of(text: str, sets=(), base: Path | None = None) -> list:
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "recipe.yaml", base or Path.cwd(), sets)
    return err.value.problems


def one_problem(text: str, sets=()):
    problems = problems_of(text, sets)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_good_recipe_gets_defaults():
    recipe = parse_recipe(GOOD, "recipe.yaml", Path.cwd()).recipe
    assert recipe.method.alpha == 32 and recipe.method.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert recipe.training.learning_rate == 1e-4 and recipe.training.lr_scheduler == "cosine"
    assert recipe.dataset.packing == "auto" and recipe.quantization is None


def test_misspelled_key_names_line_and_suggests():
    p = one_problem(GOOD.replace("learning_rate", "lerning_rate"))
    assert str(p) == ("recipe.yaml:9:3: training.lerning_rate: unknown key; did you mean "
                      "training.learning_rate?")


def test_key_in_the_wrong_section_names_the_right_one():
    p = one_problem(GOOD.replace("  learning_rate: 1.0e-4", "  r: 4"))
    assert p.key == "training.r" and "method.r" in p.message and p.location.line == 9


def test_method_specific_key_under_the_wrong_method():
    text = GOOD.replace("name: lora\n  r: 16", "name: prefix_tuning\n  r: 16")
    p = one_problem(text)
    assert p.key == "method.r" and p.location.line == 5
    assert "prefix_tuning" in p.message and "lora" in p.message


@pytest.mark.parametrize("replace, key, fragment", [
    (("r: 16", "r: 0"), "method.r", "greater than or equal to 1"),
    (("r: 16", "dropout: 1.5"), "method.dropout", "less than 1"),
    (("learning_rate: 1.0e-4", "learning_rate: -1"), "training.learning_rate", "greater than 0"),
    (("r: 16", "r: sixteen"), "method.r", "expected an integer, got 'sixteen'"),
    (("r: 16", "targets: 5"), "method.targets", "expected"),
    (("name: lora", "name: lorra"), "method.name", "did you mean lora"),
])
def test_bad_values(replace, key, fragment):
    p = one_problem(GOOD.replace(*replace))
    assert p.key == key and fragment in p.message and p.location.line is not None


def test_all_errors_reported_at_once_in_file_order():
    text = GOOD.replace("r: 16", "r: 0\n  colour: red").replace("learning_rate: 1.0e-4", "learning_rate: x")
    problems = problems_of(text)
    assert [p.key for p in problems] == ["method.r", "method.colour", "training.learning_rate"]
    assert [p.location.line for p in problems] == sorted(p.location.line for p in problems)


def test_duplicate_key():
    p = one_problem(GOOD.replace("  r: 16", "  r: 16\n  r: 8"))
    assert "duplicate key (first at line 5)" in p.message and p.location.line == 6


def test_python_tag_is_refused():
    p = one_problem("model: !!python/object/apply:os.system ['echo hi']\n")
    assert "tag not allowed" in p.message and p.location.line == 1


def test_empty_file_list_and_scalar():
    assert "empty" in one_problem("").message
    assert "not a list" in one_problem("- a\n- b\n").message
    assert "mapping of sections" in one_problem("hello\n").message


def test_yaml_syntax_error_has_position():
    p = one_problem("model:\n  name: [unclosed\n")
    assert p.message.startswith("YAML syntax") and p.location.line is not None


def test_invalid_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model:\n  name: \xff\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    p = err.value.problems[0]
    assert "UTF-8" in p.message and (p.location.line, p.location.column) == (2, 9)


def test_missing_sections_are_named():
    problems = problems_of("model: {name: x}\n")
    assert {p.key for p in problems} == {"method", "dataset", "output"}


# --- cross-key rules ---------------------------------------------------------------------------------------------

def test_qlora_implies_4bit_nf4_double_quant():
    recipe = parse_recipe(GOOD.replace("name: lora", "name: qlora"), "r.yaml", Path.cwd()).recipe
    q = recipe.quantization
    assert (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)


def test_qlora_with_8_bits_is_an_error():
    text = GOOD.replace("name: lora", "name: qlora") + "quantization:\n  bits: 8\n"
    p = one_problem(text)
    assert p.key == "quantization.bits" and "4-bit" in p.message


@pytest.mark.parametrize("key", ["quant_type: nf4", "double_quant: true", "keep_dequantized: true"])
def test_4bit_keys_with_8_bits(key):
    p = one_problem(GOOD + f"quantization:\n  bits: 8\n  {key}\n")
    assert "4-bit quantisation only" in p.message and p.location.line == 14


def test_prefix_tuning_refuses_explicit_checkpointing_and_turns_auto_off():
    prefix = GOOD.replace("name: lora\n  r: 16", "name: prefix_tuning")
    p = one_problem(prefix.replace("learning_rate: 1.0e-4", "gradient_checkpointing: true"))
    assert p.key == "training.gradient_checkpointing" and "prefix_tuning" in p.message
    recipe = parse_recipe(prefix, "r.yaml", Path.cwd()).recipe
    assert recipe.training.gradient_checkpointing is False


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_learning_cannot_pack(method):
    text = GOOD.replace("name: lora\n  r: 16", f"name: {method}")
    assert parse_recipe(text, "r.yaml", Path.cwd()).recipe.dataset.packing is False
    p = one_problem(text.replace("path: yahma/alpaca-cleaned", "path: yahma/alpaca-cleaned\n  packing: true"))
    assert p.key == "dataset.packing" and "cannot pack" in p.message


def test_trust_remote_code_on_hub_id_needs_revision(tmp_path):
    text = GOOD.replace("  name: meta-llama/Meta-Llama-3-8B", "  name: meta-llama/Meta-Llama-3-8B\n"
                        "  trust_remote_code: true")
    p = one_problem(text)
    assert p.key == "model.trust_remote_code" and "revision" in p.message
    assert parse_recipe(text.replace("trust_remote_code: true", "trust_remote_code: true\n  revision: abc123"),
                        "r.yaml", Path.cwd())
    (tmp_path / "local-model").mkdir()
    local = text.replace("meta-llama/Meta-Llama-3-8B", "./local-model")
    assert parse_recipe(local, "r.yaml", tmp_path).recipe.model.trust_remote_code


def test_warmup_steps_and_ratio_are_exclusive():
    p = one_problem(GOOD.replace("learning_rate: 1.0e-4", "warmup_steps: 5\n  warmup_ratio: 0.1"))
    assert p.key == "training.warmup_ratio"
    only_ratio = parse_recipe(GOOD.replace("learning_rate: 1.0e-4", "warmup_ratio: 0.1"), "r", Path.cwd())
    assert only_ratio.recipe.training.warmup_ratio == 0.1


def test_max_steps_takes_precedence_over_epochs():
    loaded = parse_recipe(GOOD.replace("learning_rate: 1.0e-4", "max_steps: 7\n  epochs: 3"), "r", Path.cwd())
    assert loaded.recipe.training.max_steps == 7
    assert any("epochs is ignored" in w for w in loaded.warnings)


def test_ia3_feedforward_targets_must_be_targets():
    text = GOOD.replace("name: lora\n  r: 16", "name: ia3\n  targets: [k_proj]\n  feedforward_targets: [down_proj]")
    p = one_problem(text)
    assert p.key == "method.feedforward_targets" and "down_proj" in p.message


def test_validation_fraction_range():
    p = one_problem(GOOD.replace("path: yahma/alpaca-cleaned", "path: yahma/alpaca-cleaned\n  validation: 1.5"))
    assert p.key == "dataset.validation"


# --- --set -------------------------------------------------------------------------------------------------------

def test_set_overrides_are_typed():
    loaded = parse_recipe(GOOD, "r.yaml", Path.cwd(), ["method.r=32", "method.targets=[q_proj, v_proj]",
                                                      "training.max_steps=50", "quantization.bits=4"])
    recipe = loaded.recipe
    assert recipe.method.r == 32 and recipe.method.targets == ["q_proj", "v_proj"]
    assert recipe.training.max_steps == 50 and recipe.quantization.bits == 4


def test_bad_set_reported_like_a_bad_key():
    problems = problems_of(GOOD, ["method.rr=3", "training.max_steps=abc", "nonsense"])
    text = [str(p) for p in problems]
    assert "--set method.rr=3: method.rr: unknown key; did you mean method.r?" in text
    assert "--set training.max_steps=abc: training.max_steps: expected an integer, got 'abc'" in text
    assert any(t.startswith("--set nonsense: expected dotted.key=value") for t in text)


# --- paths ---------------------------------------------------------------------------------------------------------

def test_relative_paths_resolve_from_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "model").mkdir()
    path = folder / "r.yaml"
    path.write_text(GOOD.replace("meta-llama/Meta-Llama-3-8B", "./model").replace("yahma/alpaca-cleaned",
                                                                                  "data/train.jsonl"))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(str(path)).recipe
    assert recipe.model.name == str(folder / "model")
    assert recipe.dataset.path == str(folder / "data" / "train.jsonl")
    assert recipe.output.dir == str(folder / "runs" / "x")
    # A path given with --set resolves from the current folder.
    (tmp_path / "other.jsonl").write_text("{}\n")
    recipe = load_recipe(str(path), ["dataset.path=other.jsonl", "output.dir=out"]).recipe
    assert recipe.dataset.path == str(tmp_path / "other.jsonl") and recipe.output.dir == str(tmp_path / "out")


def test_missing_local_data_file_is_an_error(tmp_path):
    p = one_problem(GOOD.replace("yahma/alpaca-cleaned", "data/missing.jsonl"))
    assert p.key == "dataset.path" and "no such file" in p.message and p.location.line == 7


def test_hub_ids_stay_hub_ids():
    recipe = parse_recipe(GOOD, "r.yaml", Path("/nonexistent")).recipe
    assert recipe.model.name == "meta-llama/Meta-Llama-3-8B" and recipe.dataset.path == "yahma/alpaca-cleaned"


# --- shipped recipes, init, schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "peftctl train recipes/" + path.name in first
    load_recipe(str(path), check_paths=path.name != "demo.yaml")


def test_every_method_has_a_shipped_recipe():
    from peftctl.methods.registry import METHODS

    shipped = {yaml.safe_load(p.read_text())["method"]["name"] for p in RECIPES}
    assert set(METHODS) <= shipped
    texts = "".join(p.read_text() for p in RECIPES)
    assert "use_dora: true" in texts and "loraplus_lr_ratio" in texts and "use_rslora: true" in texts


def test_init_output_validates_for_every_method():
    from peftctl.methods.registry import METHODS
    from peftctl.recipe.starter import starter_recipe

    for method in METHODS:
        text = starter_recipe(method, "meta-llama/Meta-Llama-3-8B")
        assert text.startswith("# Starter recipe")
        loaded = parse_recipe(text, f"{method}.yaml", Path.cwd())
        assert loaded.recipe.method.name == method


def test_schema_is_valid_and_accepts_every_shipped_recipe():
    jsonschema = pytest.importorskip("jsonschema")
    from peftctl.recipe.schema import Recipe

    schema = Recipe.model_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in RECIPES:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])
    bad = yaml.safe_load(GOOD.replace("r: 16", "r: 0"))
    assert list(validator.iter_errors(bad))


def test_every_field_has_a_description():
    from peftctl.methods.registry import METHODS
    from peftctl.recipe.schema import SECTIONS, Recipe

    classes = [Recipe, *SECTIONS.values(), *(spec.section for spec in METHODS.values())]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name, info in cls.model_fields.items()
               if not info.description]
    assert not missing


def test_as_json_problems_are_serialisable():
    problems = problems_of(GOOD.replace("r: 16", "r: 0"))
    data = json.loads(json.dumps([p.as_dict() for p in problems]))
    assert data[0]["line"] == 5 and data[0]["key"] == "method.r"


def test_recipes_folder_is_stable_under_cwd_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.getcwd() == str(tmp_path)
    recipe = load_recipe(str(REPO / "recipes" / "llama3-8b-lora.yaml")).recipe
    assert recipe.output.dir == str(REPO / "runs" / "llama3-8b-lora")


def test_readme_recipe_reference_is_generated_from_the_schema():
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    generated = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_reference.py")], capture_output=True,
                               text=True, check=True).stdout
    section = readme.split("<!-- recipe-reference -->\n", 1)[1].split("<!-- /recipe-reference -->", 1)[0]
    assert section == generated, "README's recipe reference is stale: rerun scripts/recipe_reference.py"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_command test-command" in ci
    readme = (REPO / "README.md").read_text()
    assert "<!-- test-command -->\n```bash\n" in readme and "<!-- main-command -->\n```bash\n" in readme


def test_chat_data_on_a_base_model_without_template_is_refused_at_validation(tmp_path):
    import json as json_module

    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text(json_module.dumps({"eos_token": "</s>"}))
    text = GOOD.replace("meta-llama/Meta-Llama-3-8B", "./base-model").replace(
        "path: yahma/alpaca-cleaned", "path: yahma/alpaca-cleaned\n  format: chat")
    p = problems_of(text, base=tmp_path)[0]
    assert p.key == "dataset.format" and "no chat template" not in p.message and "has none" in p.message
    assert p.location.line == 8
    named = text.replace("  name: ./base-model", "  name: ./base-model\n  chat_template: chatml")
    assert parse_recipe(named, "r.yaml", tmp_path).recipe.model.chat_template == "chatml"
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert parse_recipe(text, "r.yaml", tmp_path)


def test_init_from_must_be_an_adapter_folder(tmp_path):
    text = GOOD.replace("  r: 16", "  r: 16\n  init_from: /nope")
    p = one_problem(text)
    assert p.key == "method.init_from" and "no such adapter folder: /nope" in p.message
    assert str(p).startswith("recipe.yaml:6:")  # file and line of the key
    (tmp_path / "not-an-adapter").mkdir()
    problems = problems_of(GOOD.replace("  r: 16", "  r: 16\n  init_from: not-an-adapter"), base=tmp_path)
    assert len(problems) == 1 and "not an adapter folder" in problems[0].message
    (tmp_path / "prev" / "adapter").mkdir(parents=True)
    (tmp_path / "prev" / "adapter" / "adapter_config.json").write_text("{}")
    loaded = parse_recipe(GOOD.replace("  r: 16", "  r: 16\n  init_from: prev/adapter"), "r.yaml", tmp_path)
    assert loaded.recipe.method.init_from == str((tmp_path / "prev" / "adapter").resolve())  # relative to the recipe
