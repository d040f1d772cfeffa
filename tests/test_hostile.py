"""Hostile input, property-based: whatever a recipe or a dataset row holds, peftctl answers with exit code 0 or 2
and a message -- never a traceback, never a crash in the middle of training."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

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
        kind = draw(st.sampled_from(["good", "shaped", "random", "raw", "deep"]))
        if kind == "good":
            rows.append(json.dumps(_good_row(fmt)))
        elif kind == "shaped":
            rows.append(json.dumps({f: draw(json_values) for f in FIELDS[fmt]}))
        elif kind == "random":
            rows.append(json.dumps(draw(json_values)))
        elif kind == "deep":
            rows.append(draw(deep_json()))
        else:
            rows.append(draw(st.text(max_size=30)).replace("\n", " "))
    return rows


@st.composite
def deep_json(draw) -> str:
    """A row nested far past Python's recursion limit, as a whole row or inside a field."""
    depth = draw(st.integers(900, 120_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
    nested = opener * depth + "1" + closer * depth
    field = draw(st.sampled_from(["instruction", "output", "text", "prompt", "messages"]))
    return draw(st.sampled_from([nested, json.dumps({field: "x"})[:-1] + f', "deep": {nested}}}']))


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


# --- hostile recipes: alias bombs, deep nesting, infinities and huge integers ------------------------------------


@st.composite
def alias_bombs(draw) -> str:
    levels, width = draw(st.integers(4, 9)), draw(st.integers(3, 9))
    text = "x0: &x0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * width) + "]\n"
    return text


@st.composite
def deep_yaml(draw) -> str:
    depth = draw(st.integers(60, 100_000))
    if draw(st.booleans()):
        return "model: " + "[" * depth + "]" * depth + "\n"
    depth = min(depth, 3000)  # block style: one line per level
    return "model:\n" + "".join(" " * i + "- \n" for i in range(1, depth))


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_alias_bombs_and_deep_nesting_exit_2_fast(tmp_path, capsys, base_recipe, data):
    import time

    hostile = data.draw(st.one_of(alias_bombs(), deep_yaml()))
    text = data.draw(st.sampled_from([hostile, yaml.safe_dump(base_recipe) + hostile.replace("model:", "extra:")]))
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    start = time.perf_counter()
    assert _validate(path, capsys) == 2
    assert time.perf_counter() - start < 3.0


NUMERIC_KEYS = [("method", "alpha"), ("method", "r"), ("method", "dropout"), ("training", "learning_rate"),
                ("training", "weight_decay"), ("training", "seed"), ("training", "max_grad_norm"),
                ("training", "max_steps"), ("training", "warmup_steps"), ("training", "micro_batch_size"),
                ("dataset", "max_length"), ("dataset", "validation")]
extreme_numbers = st.one_of(st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 5e-324]),
                            st.integers(2**62, 2**200), st.integers(-2**200, -2**62))


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_infinities_and_huge_integers_never_validate_into_a_recipe_that_cannot_train(tmp_path, capsys,
                                                                                     base_recipe, data):
    import math

    from peftctl.recipe.loader import load_recipe

    recipe = copy.deepcopy(base_recipe)
    for section, key in data.draw(st.lists(st.sampled_from(NUMERIC_KEYS), min_size=1, max_size=3)):
        recipe[section][key] = data.draw(extreme_numbers)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if _validate(path, capsys) == 0:
        loaded = load_recipe(str(path)).recipe
        dumped = loaded.model_dump(mode="python")
        numbers = [v for section in dumped.values() if isinstance(section, dict) for v in section.values()
                   if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers)
        assert 0 <= loaded.training.seed < 2**63


# --- the run folder: foreign files, two runs at once, a closed stdout --------------------------------------------


@settings(max_examples=40, **SETTINGS)
@given(names=st.lists(st.sampled_from(["adapter", "merged", "checkpoints", "recipe.yaml", "metrics.jsonl",
                                       "loss.png", "tensorboard", "notes.txt", "data.jsonl"]), unique=True),
       as_dirs=st.lists(st.booleans(), min_size=9, max_size=9), resume=st.booleans(), force=st.booleans())
def test_foreign_files_in_output_dir_are_never_touched(tmp_path_factory, names, as_dirs, resume, force):
    from peftctl.errors import InvalidInput
    from peftctl.train.run_folder import LOCK_FILE, RUN_FILES, RunFolder

    folder = tmp_path_factory.mktemp("foreign")
    for name, as_dir in zip(names, as_dirs):
        if as_dir:
            (folder / name).mkdir()
            (folder / name / "theirs.bin").write_bytes(b"theirs")
        else:
            (folder / name).write_text(f"theirs: {name}")

    def snapshot():
        return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
                if p.name != LOCK_FILE}

    before = snapshot()
    run = RunFolder(folder)
    try:
        run.claim(resume=resume, force=force)
        run.clear_previous()
        assert not set(names) & set(RUN_FILES)  # claimed only where no run name was taken
    except InvalidInput as e:
        taken = [n for n in names if n in RUN_FILES]
        assert taken and str(folder / taken[0]) in e.message
    finally:
        run.release()
    assert snapshot() == before


@settings(max_examples=40, **SETTINGS)
@given(ops=st.lists(st.tuples(st.sampled_from(["claim", "release"]), st.integers(0, 1)), max_size=12))
def test_two_runs_never_hold_one_output_dir(tmp_path_factory, ops):
    from peftctl.errors import InvalidInput
    from peftctl.train.run_folder import RunFolder

    folder = tmp_path_factory.mktemp("locked")
    # Each run opens the lock file on its own descriptor, as two processes would (flock is per open file).
    import peftctl.train.run_folder as rf

    runs, holder = [RunFolder(folder), RunFolder(folder)], None
    held: dict[int, int] = {}
    try:
        for op, who in ops:
            rf._HELD.pop(str(folder.resolve()), None)
            if held.get(who) is not None:
                rf._HELD[str(folder.resolve())] = held[who]
            if op == "claim":
                try:
                    runs[who].claim(resume=False, force=False)
                    assert holder is None, "a second run took a held folder"
                    holder, held[who] = who, rf._HELD[str(folder.resolve())]
                except InvalidInput as e:
                    assert holder is not None and "in use" in e.message
            elif holder == who:
                runs[who].release()
                holder, held[who] = None, None
    finally:
        for fd in held.values():
            if fd is not None:
                import os

                os.close(fd)
        rf._HELD.pop(str(folder.resolve()), None)


class _ClosingStdout:
    """A stdout whose reader goes away after `keep` lines, like `| head -N`."""

    def __init__(self, keep: int):
        self.keep, self.lines = keep, []

    def write(self, text):
        if len(self.lines) >= self.keep:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)

    def flush(self):
        if len(self.lines) > self.keep:
            raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        import io

        raise io.UnsupportedOperation("no file")


@settings(max_examples=30, **SETTINGS)
@given(keep=st.integers(0, 6), steps=st.integers(1, 10))
def test_a_closed_stdout_asks_the_loop_to_stop_once_and_loses_no_record(tmp_path_factory, monkeypatch, keep, steps):
    from conftest import read_jsonl
    from peftctl.train.metrics import Metrics

    path = tmp_path_factory.mktemp("metrics") / "metrics.jsonl"
    fake = _ClosingStdout(keep)
    monkeypatch.setattr("sys.stdout", fake)
    metrics = Metrics(path, total_steps=steps, log_format="json")
    calls = []
    metrics.on_output_closed = lambda: calls.append(1)
    for step in range(1, steps + 1):
        metrics.log({"step": step, "loss": 1.0})
    metrics.close()
    assert len(calls) == (1 if steps > keep else 0)
    assert [r["step"] for r in read_jsonl(path)] == list(range(1, steps + 1))
    assert len(fake.lines) == min(keep, steps)
