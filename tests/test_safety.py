"""Issue 16: never run a stranger's code, never destroy a user's files, never report success for a failed run."""

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
