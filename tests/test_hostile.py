"""Hostile input, property-based: whatever a recipe or a dataset row holds, peftctl answers with exit code 0 or 2
and a message -- never a traceback, never a crash in the middle of training."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEMO_DATA, recipe_dict
from peftctl.cli.errors import run_guarded

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
KEYS = ["model", "method", "dataset", "training", "output", "quantization", "name", "r", "alpha", "targets",
        "path", "format", "max_length", "packing", "learning_rate", "micro_batch_size", "bits", "dir",
        "gradient_checkpointing", "validation", "fields", "warmup_ratio", "num_virtual_tokens", "placement"]


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated_recipes(draw, base: dict):
    recipe = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(recipe) if p]
        path = draw(st.sampled_from(paths))
        parent = recipe
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["delete", "replace", "add", "rename"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(values)
        elif action == "rename":
            parent[draw(st.sampled_from(KEYS))] = parent.pop(path[-1])
    return recipe


@st.composite
def mutated_text(draw, text: str):
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        return text[:cut]
    pos = draw(st.integers(0, len(text)))
    pieces = list(":-[]{}!&*|>'\"#%@` \n\t\\") + ["!!python/object ", "\xff", "&a ", "*a"]
    junk = "".join(draw(st.lists(st.sampled_from(pieces), max_size=6)))
    return text[:pos] + junk + text[pos:]


def _validate(path, capsys) -> int:
    from peftctl.cli import validate

    code = run_guarded(lambda: validate.run([str(path)], [], False))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 2:
        assert "error:" in captured.err
    return code


@pytest.fixture(scope="module")
def base_recipe(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return recipe_dict(tiny_model("llama"), DEMO_DATA, out=folder / "run")


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mutated_recipes_validate_to_0_or_2(tmp_path, capsys, base_recipe, data):
    recipe = data.draw(mutated_recipes(base_recipe))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    assert _validate(path, capsys) in (0, 2)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mangled_yaml_validates_to_0_or_2(tmp_path, capsys, base_recipe, data):
    text = data.draw(mutated_text(yaml.safe_dump(base_recipe)))
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert _validate(path, capsys) in (0, 2)


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_mutated_recipes_dry_run_to_0_or_2(tmp_path, capsys, base_recipe, data):
    """Through `train --dry-run` in-process: the tokenizer and the data are loaded, no weights."""
    from peftctl.cli import train

    recipe = data.draw(mutated_recipes(base_recipe))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    code = run_guarded(lambda: train.run(str(path), [], dry_run=True, resume=None, force=False, quiet=True,
                                         log_format="json", gpus=None))
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    assert "Traceback" not in captured.err


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=8)
FIELDS = {"alpaca": ["instruction", "input", "output"], "chat": ["messages"], "completion": ["text"],
          "prompt_completion": ["prompt", "completion"]}


@st.composite
def rows_for(draw, fmt: str):
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["good", "shaped", "random", "raw"]))
        if kind == "good":
            rows.append(json.dumps(_good_row(fmt)))
        elif kind == "shaped":
            rows.append(json.dumps({f: draw(json_values) for f in FIELDS[fmt]}))
        elif kind == "random":
            rows.append(json.dumps(draw(json_values)))
        else:
            rows.append(draw(st.text(max_size=30)).replace("\n", " "))
    return rows


def _good_row(fmt: str) -> dict:
    return {"alpaca": {"instruction": "Say hi.", "output": "hi"},
            "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "completion": {"text": "some text"},
            "prompt_completion": {"prompt": "2+2=", "completion": "4"}}[fmt]


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from peftctl.model import choose_pad

    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    choose_pad(tok)
    return tok


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), fmt=st.sampled_from(sorted(FIELDS)), skip=st.booleans())
def test_random_rows_are_counted_or_refused_with_their_line(tmp_path, qwen_tokenizer, data, fmt, skip):
    from peftctl.data.prepare import prepare
    from peftctl.errors import DataError
    from peftctl.recipe.schema import DatasetSection

    rows = data.draw(rows_for(fmt))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows) + "\n")
    section = DatasetSection(path=str(path), format=fmt, validation=0.0, max_length=64,
                             on_bad_rows="skip" if skip else "error")
    try:
        prepared = prepare(section, qwen_tokenizer, seed=0, pad_id=qwen_tokenizer.pad_token_id)
    except DataError as e:
        assert (f"{path} line " in e.message and not skip) or "no usable training examples" in e.message, e.message
        return
    stats = prepared.train.stats
    assert stats.examples + stats.bad_rows + stats.blank_lines + stats.skipped_no_trained_token == stats.rows_read
    assert stats.examples >= 1
    assert skip or stats.bad_rows == 0
