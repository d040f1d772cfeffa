"""Never run a stranger's code, never destroy a user's files, never report success for a failed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftctl.cli.errors import run_guarded

# --- remote code: only when the user says so on the command line ----------------------------------------------

EVIL_CONFIG = """import pathlib
pathlib.Path({sentinel!r}).write_text("ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "peftctl-evil-{tag}"
"""
EVIL_MODEL = """from transformers import LlamaForCausalLM
from .configuration_evil_{tag} import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def evil_adapter(tiny_model, trained, tmp_path):
    """An adapter whose info claims trust_remote_code and whose base has an auto_map to code that writes a file."""
    tag = tmp_path.name.replace("-", "_")[-20:]
    base = tmp_path / "evil-base"
    shutil.copytree(tiny_model("llama"), base)
    sentinel = tmp_path / "SENTINEL"
    (base / f"configuration_evil_{tag}.py").write_text(EVIL_CONFIG.format(sentinel=str(sentinel), tag=tag))
    (base / f"modeling_evil_{tag}.py").write_text(EVIL_MODEL.format(tag=tag))
    config = json.loads((base / "config.json").read_text())
    config.update(model_type=f"peftctl-evil-{tag}", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": f"configuration_evil_{tag}.EvilConfig",
                            "AutoModelForCausalLM": f"modeling_evil_{tag}.EvilForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    shutil.copytree(trained("lora", tiny_model("llama")) / "adapter", adapter)
    info = json.loads((adapter / "peftctl_adapter.json").read_text())
    info.update(base_model=str(base), trust_remote_code=True)
    (adapter / "peftctl_adapter.json").write_text(json.dumps(info))
    return adapter, sentinel


def test_an_adapter_cannot_switch_on_remote_code_for_generate(evil_adapter, capsys):
    from peftctl.cli import generate

    adapter, sentinel = evil_adapter
    code = run_guarded(lambda: generate.run(str(adapter), "hello", chat=False, max_new_tokens=2, temperature=0.0))
    err = capsys.readouterr().err
    assert not sentinel.exists()
    assert code == 2, err
    assert "--trust-remote-code" in err and "trained with trust_remote_code" in err
    # The user's own consent on the command line does run it.
    code = run_guarded(lambda: generate.run(str(adapter), "hello", chat=False, max_new_tokens=2, temperature=0.0,
                                            trust_remote_code=True))
    assert code == 0, capsys.readouterr().err
    assert sentinel.exists()


def test_an_adapter_cannot_switch_on_remote_code_for_merge(evil_adapter, tmp_path, capsys):
    from peftctl.cli import merge

    adapter, sentinel = evil_adapter
    code = run_guarded(lambda: merge.run(str(adapter), str(tmp_path / "merged"), base=None, dtype=None, verify=False,
                                         max_shard_size="5GB", from_quantized="dequantized", force=False))
    err = capsys.readouterr().err
    assert not sentinel.exists()
    assert code == 2 and "--trust-remote-code" in err, err
    assert not (tmp_path / "merged").exists()


def test_an_adapter_cannot_switch_on_remote_code_for_eval(evil_adapter, tmp_path, capsys):
    from peftctl.cli import eval as eval_command

    adapter, sentinel = evil_adapter
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n")
    options = dict(data=str(data), format="alpaca", fields=[], metrics=["loss"], max_new_tokens=2, batch_size=1,
                   max_length=64, limit=None, json_output=True, out=None, force=False, bootstrap=0, seed=0)
    code = run_guarded(lambda: eval_command.run(["base", str(adapter)], **options))
    err = capsys.readouterr().err
    assert not sentinel.exists()
    assert code == 2 and "--trust-remote-code" in err, err
    code = run_guarded(lambda: eval_command.run(["base", str(adapter)], **options, trust_remote_code=True))
    assert code == 0, capsys.readouterr().err
    assert sentinel.exists()


def test_remote_code_from_a_hub_id_needs_a_pinned_revision(trained, tiny_model, tmp_path, capsys):
    from peftctl.cli import generate

    adapter = tmp_path / "adapter"
    shutil.copytree(trained("lora", tiny_model("llama")) / "adapter", adapter)
    info = json.loads((adapter / "peftctl_adapter.json").read_text())
    info.update(base_model="someone/some-model", revision=None)
    (adapter / "peftctl_adapter.json").write_text(json.dumps(info))
    code = run_guarded(lambda: generate.run(str(adapter), "hi", chat=False, max_new_tokens=2, temperature=0.0,
                                            trust_remote_code=True))
    err = capsys.readouterr().err
    assert code == 2 and "no pinned revision" in err, err


# --- the run folder: only ours is written, only ours is deleted, one run at a time ------------------------------


def _train_in_process(recipe: Path, capsys=None, **options) -> int:
    from peftctl.cli import train

    opts = dict(dry_run=False, resume=None, force=False, quiet=True, log_format="text", gpus=None)
    opts.update(options)
    code = run_guarded(lambda: train.run(str(recipe), [], **opts))
    if capsys is not None:
        _train_in_process.err = capsys.readouterr().err
    return code


def test_a_run_never_overwrites_files_it_did_not_write(tiny_model, tmp_path, capsys):
    """output.dir: . beside the recipe, with a data file named like a run file: refused, both files intact."""
    import yaml

    from conftest import DEMO_DATA, recipe_dict

    folder = tmp_path / "experiment"
    folder.mkdir()
    data = folder / "metrics.jsonl"
    data.write_text(DEMO_DATA.read_text())
    recipe = folder / "recipe.yaml"
    text = "# my notes\n" + yaml.safe_dump(recipe_dict(tiny_model("llama"), data="metrics.jsonl", out="."))
    recipe.write_text(text)
    for force in (False, True):
        code = _train_in_process(recipe, capsys, force=force)
        assert code == 2, _train_in_process.err
        assert "output.dir" in _train_in_process.err
        assert recipe.read_text() == text and data.read_text() == DEMO_DATA.read_text()
    # Without the data inside, the foreign run-named file itself is named in the refusal.
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model("llama"), out=".")))
    code = _train_in_process(recipe, capsys, force=True)
    assert code == 2 and str(folder / "recipe.yaml") in _train_in_process.err.replace("\n", "")


def test_force_deletes_only_what_the_previous_run_wrote(tiny_model, write_recipe, tmp_path, capsys):
    from peftctl.errors import InvalidInput
    from peftctl.train.run_folder import RunFolder

    run = tmp_path / "run"
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 2, "save_every": 1})
    assert _train_in_process(recipe, capsys) == 0, _train_in_process.err
    mine = tmp_path / "run" / "notes.txt"
    mine.write_text("keep me")
    first = json.loads((run / "run.json").read_text())["started_at"]
    # A new run that fails validation deletes nothing of the old one.
    bad = write_recipe(tiny_model("llama"), name="bad.yaml", dataset={"path": str(tmp_path / "missing.jsonl")})
    assert _train_in_process(bad, capsys, force=True) == 2
    assert (run / "checkpoints").is_dir() and (run / "adapter").is_dir()
    assert json.loads((run / "run.json").read_text())["started_at"] == first
    assert _train_in_process(recipe, capsys, force=True) == 0, _train_in_process.err
    assert mine.read_text() == "keep me"
    assert "run_files" in json.loads((run / "run.json").read_text())
    # A folder of another tool with run-named folders: refused even with --force, nothing deleted.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "tensorboard").mkdir()
    with pytest.raises(InvalidInput, match="which no peftctl run wrote") as refused:
        RunFolder(other).claim(resume=False, force=True)
    assert "checkpoints" in str(refused.value) and (other / "checkpoints").is_dir()
    RunFolder(other).release()


def test_force_refuses_a_folder_that_holds_the_model(tiny_model, tmp_path, capsys):
    import yaml

    from conftest import recipe_dict

    folder = tmp_path / "out"
    shutil.copytree(tiny_model("llama"), folder / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(folder / "base", out=folder)))
    assert _train_in_process(recipe, capsys, force=True) == 2
    assert "own input" in _train_in_process.err
    assert (folder / "base" / "config.json").exists()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    import os
    import subprocess
    import sys

    from peftctl.errors import InvalidInput
    from peftctl.train.run_folder import LOCK_FILE, RunFolder

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from peftctl.train.run_folder import RunFolder;"
        "RunFolder(sys.argv[1]).claim(resume=False, force=False); print('held', flush=True); time.sleep(60)"),
        str(folder), str(Path(__file__).resolve().parents[1])], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InvalidInput) as refused:
            RunFolder(folder).claim(resume=False, force=False)
        assert f"pid {holder.pid}" in refused.value.message and "in use" in refused.value.message
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is stale and the folder can be claimed.
    lock = json.loads((folder / LOCK_FILE).read_text())
    assert lock["pid"] == holder.pid
    run = RunFolder(folder)
    run.claim(resume=False, force=False)
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    run.release()


@pytest.mark.parametrize("kind", ["nul", "loop", "under_a_file"])
def test_an_output_dir_that_cannot_be_created_exits_2(kind, tmp_path):
    from peftctl.errors import InvalidInput
    from peftctl.train.run_folder import RunFolder

    if kind == "nul":
        path = str(tmp_path / "a\0b")
    elif kind == "loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        path = str(tmp_path / "loop" / "run")
    else:
        (tmp_path / "file").write_text("x")
        path = str(tmp_path / "file" / "run")
    reason = {"nul": "contains a NUL byte", "loop": "cannot be created: Too many levels of symbolic links",
              "under_a_file": "cannot be created"}
    with pytest.raises(InvalidInput, match=reason[kind]):
        RunFolder(path).claim(resume=False, force=False)


def test_resume_auto_on_a_completed_run_says_so(tiny_model, write_recipe, tmp_path, capsys):
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 3, "save_every": 2})
    assert _train_in_process(recipe, capsys) == 0
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    code = _train_in_process(recipe, capsys, resume="auto", quiet=False)
    assert code == 0 and "complete" in _train_in_process.err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    # A checkpoint named on the command line is a request to train from it again: the same adapter comes out.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    assert _train_in_process(recipe, capsys, resume=str(checkpoint), quiet=False) == 0
    assert "complete" in _train_in_process.err and "as asked" in _train_in_process.err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


# --- exits that tell the truth ------------------------------------------------------------------------------------


def test_a_closed_stdout_stops_training_with_exit_1_and_a_checkpoint(tiny_model, write_recipe, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 200, "save_every": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "peftctl", "train", str(recipe), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert json.loads(proc.stdout.readline())["step"] == 1  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1, err
    assert "broken pipe" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 1
    assert manifest["steps_done"] < 200
    assert (tmp_path / "run" / "checkpoints" / f"step_{manifest['steps_done']:06d}").is_dir()


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


def test_sigterm_while_saving_the_adapter_is_recorded_and_leaves_no_temp_folder(tiny_model, write_recipe, tmp_path,
                                                                               capsys, monkeypatch):
    import os
    import signal

    from peftctl.methods import runtime

    real_save = runtime.save

    def save_then_sigterm(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runtime, "save", save_then_sigterm)
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 2})
    assert _train_in_process(recipe, capsys) == 143, _train_in_process.err
    run = tmp_path / "run"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["exit_code"] == 143
    assert not _leftovers(run) and not (run / "adapter").exists()


def test_disk_full_while_saving_the_adapter_is_a_failure_with_a_clear_message(tiny_model, write_recipe, tmp_path,
                                                                            capsys, monkeypatch):
    from safetensors import SafetensorError

    from peftctl.methods import runtime

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(runtime, "save", full)
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 2})
    assert _train_in_process(recipe, capsys) == 1
    assert "no space left" in _train_in_process.err and "unexpected" not in _train_in_process.err
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed" and "SafetensorError" in manifest["error"]
    assert not _leftovers(tmp_path / "run")


def test_a_merge_that_fails_after_training_is_a_failure_in_run_json(tiny_model, write_recipe, tmp_path, capsys,
                                                                   monkeypatch):
    import peftctl.merge

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peftctl.merge, "merge_adapter", broken)
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 2}, output={"merge": True})
    assert _train_in_process(recipe, capsys) == 1
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "failed" and "No space left" in manifest["merge"]["error"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()  # the adapter is kept


# --- recipes that cannot be built, values that cannot train --------------------------------------------------------


def _validate_text(tmp_path, text: str, capsys, sets=()) -> tuple[int, str]:
    from peftctl.cli import validate

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code = run_guarded(lambda: validate.run([str(path)], list(sets), False))
    return code, capsys.readouterr().err


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    text = "a: &a [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * width) + "]\n"
    return text


def test_an_alias_bomb_and_deep_nesting_are_refused_fast(tmp_path, capsys):
    import time

    for text in (alias_bomb(), "model: " + "[" * 100_000 + "]" * 100_000 + "\n",
                 "model:\n" + "".join(" " * (2 * i) + "- \n" for i in range(1, 200))):
        t = time.perf_counter()
        code, err = _validate_text(tmp_path, text, capsys)
        assert code == 2 and "recipe.yaml:" in err and "Traceback" not in err, err
        assert time.perf_counter() - t < 2.0
    code, err = _validate_text(tmp_path, "model: {name: x}\n", capsys, sets=["model.name=" + "[" * 5000])
    assert code == 2 and "--set" in err, err


@pytest.mark.parametrize("key,value", [("method.alpha", ".inf"), ("training.weight_decay", ".inf"),
                                       ("training.learning_rate", ".nan"), ("training.seed", str(2**70)),
                                       ("training.max_grad_norm", ".inf"), ("training.seed", "-1")])
def test_values_that_cannot_train_fail_validation(key, value, tiny_model, tmp_path, capsys):
    import yaml

    from conftest import recipe_dict

    text = yaml.safe_dump(recipe_dict(tiny_model("llama"), out=tmp_path / "run"))
    code, err = _validate_text(tmp_path, text, capsys, sets=[f"{key}={value}"])
    assert code == 2 and key in err, err


@pytest.fixture(scope="module")
def checkpointed(tiny_model, tmp_path_factory):
    """A run stopped at step 4 of 6 with checkpoints at 2 and 4 (its run.json says stopped)."""
    import yaml

    from conftest import recipe_dict
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    folder = tmp_path_factory.mktemp("checkpointed")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model("llama"), out=folder / "run",
                                                 training={"max_steps": 6, "save_every": 2, "keep_checkpoints": 3})))
    train(load_recipe(str(recipe)), TrainOptions(quiet=True))
    manifest = json.loads((folder / "run" / "run.json").read_text())
    (folder / "run" / "run.json").write_text(json.dumps({**manifest, "status": "stopped"}))
    shutil.rmtree(folder / "run" / "adapter")
    return recipe


def _copy_run(recipe: Path, tmp_path: Path) -> Path:
    import yaml

    shutil.copytree(recipe.parent / "run", tmp_path / "run")
    data = yaml.safe_load(recipe.read_text())
    data["output"]["dir"] = str(tmp_path / "run")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "recipe.yaml"


def _rehash(checkpoint: Path) -> None:
    """An attacker (or a bug) who also rewrites the manifest: the hashes alone cannot tell."""
    from peftctl.train import checkpoint as ckpt

    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"] = {name: ckpt._sha256(checkpoint / name) for name in manifest["files"]}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


class _Planted:
    sentinel = ""

    def __reduce__(self):
        return (Path(self.sentinel).write_text, ("ran",))


@pytest.mark.parametrize("target", ["optimizer.pt", "adapter_state.safetensors"])
def test_a_planted_pickle_is_not_a_valid_checkpoint(target, checkpointed, tmp_path, capsys):
    import pickle

    recipe = _copy_run(checkpointed, tmp_path)
    for step in (2, 4, 6):
        point = tmp_path / "run" / "checkpoints" / f"step_{step:06d}"
        if point.exists():
            _Planted.sentinel = str(tmp_path / "SENTINEL")
            (point / target).write_bytes(pickle.dumps(_Planted()))
            _rehash(point)
    point = tmp_path / "run" / "checkpoints" / "step_000004"
    code = _train_in_process(recipe, capsys, resume=str(point))
    err = _train_in_process.err
    assert code == 2, err
    assert "not a valid checkpoint" in err and "weights_only" not in err
    assert not (tmp_path / "SENTINEL").exists()


def test_a_checkpoint_with_non_finite_weights_is_not_good(checkpointed, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from peftctl.errors import PeftctlError
    from peftctl.train import checkpoint as ckpt

    recipe = _copy_run(checkpointed, tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "step_000004"
    weights = load_file(str(newest / "adapter_state.safetensors"))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(newest / "adapter_state.safetensors"))
    _rehash(newest)
    path, notes = ckpt.find_resumable(tmp_path / "run" / "checkpoints", "auto")
    assert path.name == "step_000002" and "non-finite" in notes[0]
    with pytest.raises(PeftctlError, match="not finite") as refused:  # and none is ever written
        ckpt.save(tmp_path / "ck", weights, {}, None, ckpt.TrainerState(step=9), "", "", 2)
    assert "not finite" in str(refused.value) and not (tmp_path / "ck" / "step_000009").exists()
    assert _train_in_process(recipe, capsys, resume="auto") == 0, _train_in_process.err


# --- data: one bad row is one bad row; validation never leaks; drops are counted -----------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from peftctl.model import choose_pad

    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    choose_pad(tok)
    return tok


def _rows(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"instruction": f"Say the number {i}.", "output": f"number {i} it is"})
            for i in range(start, start + n)]


def _prepare(tokenizer, **section):
    from peftctl.data.prepare import prepare
    from peftctl.recipe.schema import DatasetSection

    section = {"format": "alpaca", "validation": 0.0, "max_length": 64, "packing": False, **section}
    return prepare(DatasetSection(**section), tokenizer, seed=0, pad_id=tokenizer.pad_token_id)


def deep_row(depth: int = 100_000) -> str:
    return '{"instruction": ' + "[" * depth + "]" * depth + ', "output": "x"}'


def test_a_pathological_json_row_is_one_bad_row(tokenizer, tmp_path):
    from peftctl.errors import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(_rows(3) + [deep_row()] + _rows(2, 3)) + "\n")
    data = _prepare(tokenizer, path=str(path), on_bad_rows="skip")
    assert data.train.stats.bad_rows == 1 and data.train.stats.examples == 5
    with pytest.raises(DataError) as refused:
        _prepare(tokenizer, path=str(path), on_bad_rows="error")
    assert f"{path} line 4" in refused.value.message and "nested" in refused.value.message
    whole = tmp_path / "rows.json"
    whole.write_text("[" + deep_row() + "]")
    with pytest.raises(DataError, match="nested too deeply to be a list of rows"):
        _prepare(tokenizer, path=str(whole), on_bad_rows="skip")


def test_mixed_sources_are_split_before_mixing(tokenizer, tmp_path):
    """A small source repeated by the mix never has a copy on both sides of the split."""
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text("\n".join(_rows(4)) + "\n")
    large.write_text("\n".join(_rows(20, 100)) + "\n")
    data = _prepare(tokenizer, path=None, validation=0.25,
                    mix=[{"path": str(small), "examples": 24}, {"path": str(large), "weight": 1.0}])
    train = {tuple(ids) for ids in data.train.examples["input_ids"]}
    validation = [tuple(ids) for ids in data.validation.examples["input_ids"]]
    assert validation and not train & set(validation)
    assert len(validation) == len(set(validation))  # each source's share of validation, no repeats
    assert len(data.train.examples) > len(train)  # the small source was repeated on the training side


def test_silent_drops_are_counted_or_refused(tokenizer, tmp_path):
    from peftctl.errors import DataError

    one = tmp_path / "one.jsonl"
    one.write_text(_rows(1)[0] + "\n")
    with pytest.raises(DataError) as refused:
        _prepare(tokenizer, path=str(one), validation=0.5)
    assert "nothing to validate on" in refused.value.message

    long = tmp_path / "long.jsonl"
    rows = [json.dumps({"instruction": "word " * 60, "output": "yes"}) for _ in range(18)] + _rows(2)
    long.write_text("\n".join(rows) + "\n")
    data = _prepare(tokenizer, path=str(long), max_length=40)
    assert any("18 of 20 examples skipped" in w for w in data.warnings), data.warnings

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(_rows(10)) + "\n")
    copy = tmp_path / "validation.jsonl"
    copy.write_text(train.read_text())
    with pytest.raises(DataError) as refused:
        _prepare(tokenizer, path=str(train), validation=str(copy))
    assert "all 10 validation examples are also training examples" in refused.value.message
    copy.write_text("\n".join(_rows(3, 8)) + "\n")  # two of three overlap
    data = _prepare(tokenizer, path=str(train), validation=str(copy))
    assert any("2 of 3 validation examples" in w for w in data.warnings), data.warnings


# --- known causes are exit 2 (or 1 for the network) with a message, never "unexpected error" -----------------------


@pytest.mark.parametrize("damage,words", [
    ({"bottleneck_config.json": {"format_version": 1, "width": 8, "activation": "relu", "dropout": 0.0}},
     "'placement'"),
    ({"peft_type": "NOPE"}, "unknown adapter type"),
    ({"r": 10**9}, "not a plausible size"),
    ({"r": 4}, "does not match the weights"),
])
def test_damaged_adapter_configs_are_refused_before_allocating(damage, words, trained, tiny_model, tmp_path, capsys):
    from peftctl.cli import generate

    adapter = tmp_path / "adapter"
    shutil.copytree(trained("lora", tiny_model("llama")) / "adapter", adapter)
    if "bottleneck_config.json" in damage:
        (adapter / "bottleneck_config.json").write_text(json.dumps(damage["bottleneck_config.json"]))
    else:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **damage}))
    code = run_guarded(lambda: generate.run(str(adapter), "hi", chat=False, max_new_tokens=2, temperature=0.0))
    err = capsys.readouterr().err
    assert code == 2 and words in err and "unexpected" not in err, err


def test_the_rank_check_knows_expert_factors_are_stacked(tmp_path):
    """peft's parameter wrapper stores one rank-r factor per expert in one lora_A (r x experts rows): a real MoE
    adapter passes the rank check, the same weights under a plain LoRA config do not."""
    import torch
    from safetensors.torch import save_file

    from peftctl.errors import InvalidInput
    from peftctl.methods.runtime import check_config

    save_file({"base_model.model.layers.0.mlp.experts.base_layer.lora_A.weight": torch.zeros(8 * 4, 16),
               "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 16)},
              str(tmp_path / "adapter_model.safetensors"))
    moe = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_parameters": ["experts.gate_up_proj"]}
    check_config(tmp_path, "lora", moe)
    with pytest.raises(InvalidInput, match="r 8 does not match the weights \\(rank 32\\)"):
        check_config(tmp_path, "lora", {**moe, "target_parameters": None})
    with pytest.raises(InvalidInput, match="does not match the weights"):
        check_config(tmp_path, "lora", {**moe, "r": 3})


def test_a_hub_dataset_without_network_is_a_network_failure(tokenizer, monkeypatch, capsys):
    import datasets
    import httpx2

    def offline(*args, **kwargs):  # what huggingface_hub's client raises after its retries
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = run_guarded(lambda: _prepare(tokenizer, path="someone/data"))
    err = capsys.readouterr().err
    assert code == 1 and "cannot be reached" in err and "unexpected" not in err, err


def test_no_message_ever_repeats_torchs_weights_only_advice(tmp_path):
    import pickle

    import torch

    from peftctl.cli.errors import classify

    _Planted.sentinel = str(tmp_path / "SENTINEL")
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Planted()))
    with pytest.raises(pickle.UnpicklingError, match="weights_only") as raised:
        torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    message, hint, code = classify(raised.value)
    assert "weights_only" in str(raised.value)  # torch's own text, which we must not pass on
    assert code == 2 and "not valid" in message and "weights_only" not in message + (hint or "")
    assert not (tmp_path / "SENTINEL").exists()
