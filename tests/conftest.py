"""Shared test fixtures: tiny models made locally (random weights, a locally trained tokenizer, saved as ordinary
model folders), recipes written for them, and the CLI run in-process or as a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
DEMO_DATA = REPO / "recipes" / "data" / "demo.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("PEFTCTL_DEBUG", None)
# Triton's interpreter runs LoRA's dropout kernel on CPU tensors (tests/test_lora_dropout_kernel.py). It is chosen
# when triton is first imported (bitsandbytes imports it), so here; never where a GPU exists, whose runs (liger's
# kernels too) must compile.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_test_is_not_one_command(monkeypatch):
    """startup.prepare (main()'s) marks a process as running one command, which lets train hide bitsandbytes for
    good; a test that calls it must not leave a later test's process so marked (a 4-bit model may load next)."""
    from peftctl import startup

    monkeypatch.setattr(startup, "_ONE_COMMAND", False)
    hidden_before = "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None
    yield
    deferring = [f for f in sys.meta_path if isinstance(f, startup._DeferCompileFinder)]
    if deferring:
        for finder in deferring:
            sys.meta_path.remove(finder)  # undone for the tests after it; this one is told
        pytest.fail("the test left bitsandbytes' compile deferral in place: stub startup.defer_bitsandbytes_compile")
    if not hidden_before and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]  # undone for the tests after it; this one is told
        pytest.fail("the test hid bitsandbytes for the rest of the session: stub startup.hide_bitsandbytes")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch="llama", **sizes) -> folder of a tiny model, made once per test session."""
    from make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    made: dict[tuple, Path] = {}

    def get(arch: str = "llama", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"{arch}-{len(made)}"
            made[key] = make_tiny_model(arch, root / name, corpus=DEMO_DATA, **kwargs)
        return made[key]

    return get


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """trained(name, model, **sections) -> run folder (4 steps on the demo data), trained once per test session:
    modules that ask for the same model and sections share one run, whatever name they give it. Tests read these
    folders; one that changes a run must copy it first."""
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(name: str, model: Path, **sections) -> Path:
        key = yaml.safe_dump(recipe_dict(model, **copy.deepcopy(sections)), sort_keys=True)  # what is trained
        if key not in done:
            out = root / f"{name}-{len(done)}"
            recipe = root / f"{name}-{len(done)}.yaml"
            recipe.write_text(yaml.safe_dump(recipe_dict(model, out=out, **sections), sort_keys=False))
            train(load_recipe(str(recipe), []), TrainOptions(quiet=True))
            done[key] = out
        return done[key]

    return get


def recipe_dict(model_dir: Path | str, data: Path | str = DEMO_DATA, out: Path | str = "run", **sections) -> dict:
    """A small recipe for a tiny model; `sections` override whole keys, e.g. method={"name": "ia3"}."""
    recipe = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "dataset": {"path": str(data), "format": "alpaca", "validation": 0.0, "max_length": 128},
        "training": {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation": 1, "learning_rate": 1e-3,
                     "warmup_steps": 0, "eval_every": 100, "save_every": 100, "seed": 0},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and key in recipe and not value.pop("_replace", False):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(model, name="recipe.yaml", **sections) -> path of a recipe file in tmp_path."""
    def write(model_dir, name: str = "recipe.yaml", **sections) -> Path:
        sections.setdefault("out", tmp_path / "run")
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe_dict(model_dir, **sections), sort_keys=False))
        return path

    return write


# `python -c REAL_PROCESS ARGS...` runs `peftctl ARGS...` as main() runs it, then writes to stderr its exit code and
# which heavy modules the process imported: "EXIT=0 HEAVY=" is a clean exit that imported neither.
REAL_PROCESS = """
import runpy, sys
sys.argv = ["peftctl", *sys.argv[1:]]
try:
    runpy.run_module("peftctl", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = [m for m in ("bitsandbytes", "torch._inductor.compile_fx") if sys.modules.get(m) is not None]
sys.stderr.write(f"EXIT={code} HEAVY={','.join(heavy)}")
"""


def cli(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `peftctl ARGS` in this process (no second torch import): the exit code as `returncode`, stdout and
    stderr apart, as run_cli returns them. Use run_cli only for what needs a process of its own: signals,
    the console script's start-up, one smoke test per behaviour."""
    from typer.testing import CliRunner

    from peftctl.cli.app import app

    result = CliRunner().invoke(app, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the CLI would print: the test fails with it
    return subprocess.CompletedProcess(["peftctl", *args], result.exit_code, result.stdout, result.stderr)


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m peftctl ARGS` in a subprocess: the real exit code, stdout and stderr."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "peftctl", *args], input=input, capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(REPO))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fused_adamw(build):
    """`build` (optim.build_optimizer) with torch's fused AdamW, as the loop gets it on a GPU (torch has it on the
    CPU too): the loop then queues the update on the device and launches steps ahead (peftctl/train/loop.py)."""

    def fused(model, recipe, device):
        import torch

        groups = [{**group, "fused": True, "foreach": None} for group in build(model, recipe, device).param_groups]
        return torch.optim.AdamW(groups, fused=True)

    return fused
