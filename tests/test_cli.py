"""The command line as users meet it: exit codes, messages without tracebacks, fast commands without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_PROCESS, REPO, cli, run_cli
from peftctl.cli.errors import run_guarded
from peftctl.errors import EXIT_FAILURE, InvalidInput

LORA_RECIPE = str(REPO / "recipes" / "llama3-8b-lora.yaml")


def no_traceback(result):
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


@pytest.mark.parametrize("text, fragment", [
    ("model: {name: x}\nmethod: {name: lora}\ndataset: {path: d}\noutput: {dir: o}\ntraining: {lerning_rate: 1}\n",
     "5:12: training.lerning_rate: unknown key; did you mean training.learning_rate?"),
    ("a: 1\na: 2\n", "2:1: a: duplicate key"),
    ("a: !!python/object/apply:os.system ['true']\n", "tag not allowed"),
    ("", "the recipe is empty"),
    ("- 1\n", "not a list"),
])
def test_validate_bad_recipes_exit_2_with_position(tmp_path, text, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    no_traceback(result)


def test_validate_missing_file_and_bad_set():
    result = cli("validate", "no/such/recipe.yaml")
    assert result.returncode == 2 and "no such recipe file" in result.stderr
    no_traceback(result)
    result = cli("validate", LORA_RECIPE, "--set", "method.r=zero")
    assert result.returncode == 2 and "--set method.r=zero: method.r: expected an integer" in result.stderr
    no_traceback(result)


def test_validate_invalid_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model: {name: \xfe}\n")
    result = cli("validate", str(path))
    assert result.returncode == 2 and "not valid UTF-8" in result.stderr and ":1:15:" in result.stderr


def test_validate_json_and_several_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(LORA_RECIPE).read_text().replace("r: 16", "r: 0"))
    result = cli("validate", "--json", LORA_RECIPE, str(bad))
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert [r["valid"] for r in report] == [True, False]
    assert report[1]["errors"][0]["key"] == "method.r" and report[1]["errors"][0]["line"] == 7
    ok = cli("validate", "--json", LORA_RECIPE)
    assert ok.returncode == 0 and json.loads(ok.stdout)["valid"] is True


def test_validate_reads_stdin():
    result = cli("validate", "-", input=Path(LORA_RECIPE).read_text())
    assert result.returncode == 0, result.stderr
    result = cli("validate", "-", input="model: {name: x}\n")
    assert result.returncode == 2 and "<stdin>" in result.stderr


def test_init_prints_a_recipe_that_validates(tmp_path):
    result = cli("init", "--method", "ia3", "--model", "Qwen/Qwen2.5-7B")
    assert result.returncode == 0
    path = tmp_path / "r.yaml"
    path.write_text(result.stdout)
    assert cli("validate", str(path)).returncode == 0
    bad = cli("init", "--method", "nope")
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_schema_is_json():
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "peftctl recipe" and "method" in schema["properties"]


def test_version_and_module_entry_point():  # the one subprocess here: `python -m peftctl` itself
    from peftctl import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"peftctl {__version__}"


def test_unknown_option_is_exit_2():
    result = cli("validate", LORA_RECIPE, "--colour")
    assert result.returncode == 2


@pytest.mark.parametrize("args", [["--help"], ["validate", LORA_RECIPE], ["init"], ["schema"],
                                  ["train", "--help"]])
def test_fast_commands_import_neither_torch_nor_transformers(args):
    code = ("import sys\n"
            "from peftctl.cli.app import main\n"
            f"sys.argv = ['peftctl', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
            "sys.stderr.write('HEAVY=' + ','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert "HEAVY=" in result.stderr and result.stderr.rsplit("HEAVY=", 1)[1].strip() == ""


def test_unclassified_errors_exit_1_with_debug_hint(capsys, monkeypatch):
    def boom():
        raise RuntimeError("something odd")

    monkeypatch.delenv("PEFTCTL_DEBUG", raising=False)
    assert run_guarded(boom) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "unexpected error: RuntimeError: something odd" in err and "PEFTCTL_DEBUG=1" in err
    assert "Traceback" not in err
    monkeypatch.setenv("PEFTCTL_DEBUG", "1")
    assert run_guarded(boom) == EXIT_FAILURE
    assert "Traceback" in capsys.readouterr().err


def test_known_errors_keep_their_exit_code(capsys):
    def invalid():
        raise InvalidInput("bad thing", hint="do this")

    assert run_guarded(invalid) == 2
    err = capsys.readouterr().err
    assert "error: bad thing" in err and "hint: do this" in err


def test_out_of_memory_is_exit_3(capsys):
    class OutOfMemoryError(RuntimeError):
        pass

    def oom():
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_guarded(oom) == 3
    assert "micro_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("args", [[], ["train"], ["generate"], ["validate"], ["merge"], ["count-params"]])
def test_help_names_values_without_type_placeholders(args):
    """typer 0.29 renders `--dry-run <bool>` and `{recipe}`: flags take no value and arguments have names."""
    from typer.testing import CliRunner

    from peftctl.cli.app import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "150", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "<str>" not in result.output and "{" not in result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    if args == ["train"]:
        assert usage.strip().endswith("[OPTIONS] RECIPE") and "auto|PATH" in result.output
    if args == ["generate"]:
        assert usage.strip().endswith("ADAPTER_OR_MODEL [PROMPT]")


@pytest.mark.parametrize("argv,hidden", [
    (["count-params", "r.yaml", "--memory"], True),
    (["--version"], False),
    (["train", "count-params.yaml"], False),  # the command is the first word, not any word
    (["merge", "run/adapter", "--out", "count-params"], False),
    (["generate", "run", "hi"], False),
])
def test_only_count_params_runs_without_bitsandbytes(argv, hidden, monkeypatch):
    """main() hides bitsandbytes for count-params alone: every other command may load a quantised model, and
    there bitsandbytes' import defers its torch.compile wrappers."""
    from peftctl import startup

    calls = []
    monkeypatch.setattr(startup, "hide_bitsandbytes", lambda: calls.append("hide"))
    monkeypatch.setattr(startup, "defer_bitsandbytes_compile", lambda: calls.append("defer"))
    startup.prepare(argv)
    assert calls == (["hide"] if hidden else ["defer"])


def test_bitsandbytes_import_defers_torch_compile_to_the_first_call(tmp_path, monkeypatch):
    """With the deferral in place, importing bitsandbytes (a stand-in package here, first on sys.path) wraps
    functions without calling torch.compile; each wrapper calls it once, with the same arguments, at its first call
    and then calls what it returned; a module is compiled at once; torch.compile is the caller's again after the
    import, and the module names its own loader. An availability check imports nothing."""
    import importlib
    import importlib.util

    import torch

    from peftctl import startup

    package = tmp_path / "bitsandbytes"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\n"
        "def double(x):\n    return 2 * x\n"
        "direct = torch.compile(double, dynamic=False)\n"
        "@torch.compile(fullgraph=True)\n"
        "def triple(x):\n    return 3 * x\n"
        "class Box:\n    pass\n"
        "box = Box()\n"
        "boxed = torch.compile(box)\n"
        "compile_in_import = torch.compile\n")
    calls = []

    def compile_now(model=None, **options):
        calls.append((getattr(model, "__name__", model), options))
        return lambda *args: ("compiled", getattr(model, "__name__", None), args)

    with monkeypatch.context() as patched:  # all undone, the finder and the stand-in too, before the checks
        patched.setattr(torch, "compile", compile_now)
        patched.setattr(sys, "meta_path", list(sys.meta_path))
        patched.delitem(sys.modules, "bitsandbytes", raising=False)
        patched.syspath_prepend(str(tmp_path))
        assert startup.defer_bitsandbytes_compile() and not startup.defer_bitsandbytes_compile()  # once
        spec = importlib.util.find_spec("bitsandbytes")
        assert spec.origin == str(package / "__init__.py") and "bitsandbytes" not in sys.modules
        module = importlib.import_module("bitsandbytes")
        assert importlib.util.find_spec("bitsandbytes") is module.__spec__  # imported: the finder not asked
        assert torch.compile is compile_now and module.compile_in_import is not compile_now
        del sys.modules["bitsandbytes"]  # the stand-in; the real one (if imported before) comes back
    assert calls == [(module.box, {})]  # only the module (no function) compiled during the import
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__

    assert module.direct(5) == ("compiled", "double", (5,)) and module.direct(6) == ("compiled", "double", (6,))
    assert module.triple(2) == ("compiled", "triple", (2,))
    assert calls == [(module.box, {}), ("double", {"dynamic": False}), ("triple", {"fullgraph": True})]
    assert module.direct.__name__ == "double"


def test_the_deferral_survives_a_failing_compile_a_copy_and_a_finder_that_asks_again(tmp_path, monkeypatch):
    """A compile that fails is tried once (bitsandbytes' fallback then runs without another attempt); the wrapped
    loader can be copied; a finder that asks importlib.util.find_spec for bitsandbytes while the deferral searches
    gets an answer, and the loader is wrapped once."""
    import copy
    import importlib
    import importlib.util

    from peftctl import startup

    attempts = []

    def failing(model=None, **options):
        attempts.append(model)
        raise RuntimeError("torch.compile is not supported here")

    later = startup._compile_on_first_call(failing)(lambda x: x)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="not supported"):
            later(1)
    assert len(attempts) == 1

    package = tmp_path / "bitsandbytes"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 7\n")
    asked = []

    class Asking:  # as a post-import hook library does (wrapt): looks the name up again through the import
        busy = False  # system, once, and answers with what it found

        def find_spec(self, name, path=None, target=None):
            if name != "bitsandbytes" or self.busy:
                return None
            self.busy = True
            try:
                asked.append(importlib.util.find_spec(name))
                return asked[-1]
            finally:
                self.busy = False

    with monkeypatch.context() as patched:
        patched.setattr(sys, "meta_path", list(sys.meta_path))
        patched.delitem(sys.modules, "bitsandbytes", raising=False)
        patched.syspath_prepend(str(tmp_path))
        assert startup.defer_bitsandbytes_compile()
        sys.meta_path.insert(1, Asking())  # asked by the deferral's search
        spec = importlib.util.find_spec("bitsandbytes")
        assert asked and spec.origin == str(package / "__init__.py")
        assert isinstance(spec.loader, startup._DeferCompileLoader)
        assert not isinstance(spec.loader.loader, startup._DeferCompileLoader)  # wrapped once
        assert copy.copy(spec.loader).loader is spec.loader.loader
        module = importlib.import_module("bitsandbytes")
        assert module.VALUE == 7 and type(module.__loader__).__name__ == "SourceFileLoader"
        del sys.modules["bitsandbytes"]


def test_a_qlora_run_trains_without_importing_the_torch_compiler(tiny_model, write_recipe, tmp_path):
    """`peftctl train` of a QLoRA recipe as a real process: bitsandbytes is imported (the 4-bit base needs it) but
    the torch compiler its import used to pull in is not (its torch.compile wrappers wait for a first call, which
    the run never makes), and the run trains and saves its adapter."""
    pytest.importorskip("bitsandbytes")
    recipe = write_recipe(tiny_model("llama"), quantization={"bits": 4}, training={"max_steps": 2})
    proc = subprocess.run([sys.executable, "-c", REAL_PROCESS, "train", str(recipe), "--quiet"], capture_output=True,
                          text=True, cwd=str(REPO), timeout=600)
    assert proc.stderr.endswith("EXIT=0 HEAVY=bitsandbytes"), proc.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("sections, may_need", [
    ({}, False),  # bf16-style LoRA on a local folder: never
    ({"quantization": {"bits": 4}}, True),
    ({"method": {"name": "qlora", "r": 8, "alpha": 16, "_replace": True}}, True),
    ({"training": {"optimizer": "adamw_8bit"}}, True),
    ({"training": {"optimizer": "paged_adamw"}}, True),
    ({"model": {"trust_remote_code": True, "revision": "0" * 40}}, True),  # the model's own code
    ({"evaluation": {"data": "d.jsonl", "metrics": ["mymetrics:score"]}}, True),  # the user's code
    ({"evaluation": {"data": "d.jsonl", "metrics": ["loss"]}}, False),
])
def test_train_may_need_bitsandbytes_where_anything_could_quantise(tiny_model, write_recipe, tmp_path, sections,
                                                                   may_need):
    from peftctl import startup
    from peftctl.recipe.loader import load_recipe

    if "evaluation" in sections:
        (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        sections["evaluation"]["data"] = str(tmp_path / "d.jsonl")
    recipe = load_recipe(str(write_recipe(tiny_model("llama"), **sections))).recipe
    assert startup.train_may_need_bitsandbytes(recipe) is may_need


def test_a_checkpoint_saved_quantised_or_a_hub_base_may_need_bitsandbytes(tiny_model, write_recipe, tmp_path):
    import shutil

    from peftctl import startup
    from peftctl.recipe.loader import load_recipe

    quantised = tmp_path / "quantised"
    shutil.copytree(tiny_model("llama"), quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    assert startup.train_may_need_bitsandbytes(load_recipe(str(write_recipe(quantised))).recipe)
    hub = load_recipe(str(write_recipe("acme/llama-3-8b", name="hub.yaml"))).recipe  # no config at hand
    assert startup.train_may_need_bitsandbytes(hub)
    (quantised / "config.json").write_text("{not json")  # a config that cannot be read says nothing
    assert startup.train_may_need_bitsandbytes(load_recipe(str(write_recipe(quantised, name="bad.yaml"))).recipe)


def test_train_hides_bitsandbytes_only_in_its_own_process_and_where_the_run_cannot_need_it(
        tiny_model, write_recipe, monkeypatch):
    from peftctl import startup

    calls = []
    monkeypatch.setattr(startup, "hide_bitsandbytes", lambda: calls.append(True) or True)
    plain = write_recipe(tiny_model("llama"))
    assert cli("train", str(plain), "--dry-run", "--quiet").returncode == 0
    assert calls == []  # a test's process (no main()): a later test may load a 4-bit model
    monkeypatch.setattr(startup, "_ONE_COMMAND", True)
    assert cli("train", str(plain), "--dry-run", "--quiet").returncode == 0
    assert calls == [True]
    quantised = write_recipe(tiny_model("llama"), "q.yaml", quantization={"bits": 4})
    assert cli("train", str(quantised), "--dry-run", "--quiet").returncode == 0
    assert calls == [True]


def test_a_lora_run_trains_without_importing_bitsandbytes(tiny_model, write_recipe, tmp_path):
    """`peftctl train` of a LoRA recipe on an unquantised local base, as a real process: it trains, saves its
    adapter, and never imports bitsandbytes or the torch compiler that bitsandbytes pulls in."""
    recipe = write_recipe(tiny_model("llama"), training={"max_steps": 2})
    proc = subprocess.run([sys.executable, "-c", REAL_PROCESS, "train", str(recipe), "--quiet"], capture_output=True,
                          text=True, cwd=str(REPO), timeout=600)
    assert proc.stderr.endswith("EXIT=0 HEAVY="), proc.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_third_party_kernel_chatter_stays_out_unless_debugging(monkeypatch):
    """bitsandbytes logs, at import on a CPU with AVX512-BF16, that an optional kernel package is missing: main()
    keeps that logger to errors (a real error still shows), and PEFTCTL_DEBUG=1 lets it through."""
    import logging

    from peftctl import startup

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    monkeypatch.delenv("PEFTCTL_DEBUG", raising=False)
    startup.prepare(["train", "recipe.yaml"])
    assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    logger.setLevel(logging.NOTSET)
    monkeypatch.setenv("PEFTCTL_DEBUG", "1")
    startup.prepare(["train", "recipe.yaml"])
    assert logger.isEnabledFor(logging.WARNING)
