"""`peftctl merge`: merged logits equal base + adapter for every mergeable method, quantised bases and model family
(GPT-NeoX, Phi-3, Falcon, Mixtral, Qwen3-MoE experts), the bf16 tolerance follows from rounding while a wrong merge
still fails, the GPU pipeline writes what the CPU path writes, the output is an ordinary model folder, verification
catches an adapter that does nothing, nothing half-written is ever left at --out, refusals exit 2, and peak memory
stays near one shard (slow test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from peftctl.errors import InvalidInput
from peftctl.merge import (
    MERGE_INFO,
    SafetensorsFolder,
    dequantized_weight,
    merge_adapter,
    parse_shard_size,
    quantized_weights,
    weight_transform,
)

METHOD_SECTIONS = {
    "lora": {"name": "lora"},
    "dora": {"name": "lora", "use_dora": True},
    "rslora": {"name": "lora", "use_rslora": True, "targets": "all-linear"},
    "ia3": {"name": "ia3", "_replace": True, "targets": ["k_proj", "v_proj", "down_proj"],
            "feedforward_targets": ["down_proj"]},
}
IDS = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(1))


# --- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_model):
    """A tiny llama in three safetensors shards (with an index), as real bases come."""
    return tiny_model("llama", shards=3)




def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def load_plain(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def adapter_on_base(run: Path, quantization: dict | None = None):
    """The adapter on its base as training saw it (quantised when it was), through peftctl's strict loader."""
    from peftctl.methods import runtime
    from peftctl.model import load_model
    from peftctl.recipe.schema import ModelSection, QuantizationSection

    info = json.loads((run / "adapter" / "peftctl_adapter.json").read_text())
    recipe = SimpleNamespace(model=ModelSection(name=info["base_model"], dtype="float32"),
                             quantization=QuantizationSection(**quantization) if quantization else None)
    return runtime.load(load_model(recipe, torch.device("cpu")), run / "adapter").eval()


def fresh_lora(model: Path, out: Path) -> Path:
    """An untrained LoRA adapter (B = 0: it changes nothing), saved as training would save it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_plain(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(out))
    (out / "peftctl_adapter.json").write_text(json.dumps(
        {"method": "lora", "base_model": str(model), "revision": None, "dtype": "float32", "quantization": None,
         "loraplus_lr_ratio": None, "can_merge": True}))
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


# --- merged logits equal base + adapter --------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD_SECTIONS))
def test_merged_logits_equal_the_adapter(method, base, trained, tmp_path):
    run = trained(method, base, method=dict(METHOD_SECTIONS[method]))
    report = merge_adapter(run / "adapter", tmp_path / "merged")
    check = report.verification
    assert check["relative_diff"] < 1e-5 and check["base_relative_diff"] > 1e-3, check
    merged = logits(load_plain(tmp_path / "merged"))
    with_adapter = logits(adapter_on_base(run))
    assert relative(merged, with_adapter) < 1e-5
    assert relative(merged, logits(load_plain(base))) > 1e-3  # the adapter is really in there
    recorded = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert recorded["method"] == ("ia3" if method == "ia3" else "lora")
    assert recorded["verification"]["relative_diff"] == check["relative_diff"]
    assert recorded["base"] == str(base) and recorded["dtype"] == "float32" and recorded["from_quantized"] is None


CUSTOM_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "peftctl-tiny-custom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_a_base_with_its_own_code_merges_when_trusted(base, write_recipe, tmp_path):
    """A model whose classes live in its folder (auto_map) trains with model.trust_remote_code and merges with the
    same consent given again on the command line: verification builds the model from that code too."""
    import shutil

    custom = tmp_path / "custom-base"
    shutil.copytree(base, custom)
    (custom / "custom_model.py").write_text(CUSTOM_CODE)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="peftctl-tiny-custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "custom_model.TinyCustomConfig",
                            "AutoModelForCausalLM": "custom_model.TinyCustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    recipe = write_recipe(custom, model={"trust_remote_code": True}, out=tmp_path / "run")
    train(load_recipe(str(recipe), []), TrainOptions(quiet=True))
    run = tmp_path / "run"
    # In a fresh process, as users run it: training registered the custom classes in this one.
    done = run_cli("merge", str(run), "--out", str(tmp_path / "merged"), "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    verification = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())["verification"]
    assert verification["relative_diff"] < 1e-5 and verification["base_relative_diff"] > 1e-3
    assert (tmp_path / "merged" / "custom_model.py").exists()  # the merged folder still loads with its code
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), trust_remote_code=True)
    assert type(merged).__name__ == "TinyCustomForCausalLM"
    # Verification built the base's own class: with the consent passed on, not left for transformers to ask.
    from transformers import AutoConfig

    from peftctl.merge import empty_model

    assert type(empty_model(AutoConfig.from_pretrained(str(custom), trust_remote_code=True),
                            trust_remote_code=True)).__name__ == "TinyCustomForCausalLM"


def test_gpt2_conv1d_weights_merge_transposed(tiny_model, trained, tmp_path):
    """GPT-2 stores its projections as Conv1D (in, out): the delta is transposed (fan_in_fan_out)."""
    model = tiny_model("gpt2")
    run = trained("gpt2", model, method={"targets": ["c_attn", "c_proj"]})
    merge_adapter(run, tmp_path / "merged")
    assert relative(logits(load_plain(tmp_path / "merged")), logits(adapter_on_base(run))) < 1e-5


QLORA = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def test_qlora_merges_onto_the_dequantised_weights(base, trained, tmp_path):
    run = trained("qlora", base, method={"name": "qlora", "targets": "all-linear"}, quantization=QLORA)
    trained_function = logits(adapter_on_base(run, QLORA))  # the 4-bit base + adapter, as in training

    report = merge_adapter(run, tmp_path / "dequantized")
    assert report.from_quantized == "dequantized" and report.quantization["bits"] == 4
    assert any("dequantised" in note for note in report.notes)
    exact = relative(logits(load_plain(tmp_path / "dequantized")), trained_function)
    assert exact < 1e-5

    report = merge_adapter(run, tmp_path / "original", from_quantized="original")
    off = relative(logits(load_plain(tmp_path / "original")), trained_function)
    quantisation_error = report.verification["quantization_relative_diff"]
    assert off > 100 * exact and 0.2 * quantisation_error < off < 5 * quantisation_error
    # What it says (on its own token sequences) is what it is (on these).
    assert 0.5 * off < report.verification["trained_relative_diff"] < 2 * off
    assert any("about one quantisation error" in note for note in report.notes)
    recorded = json.loads((tmp_path / "original" / MERGE_INFO).read_text())
    assert recorded["from_quantized"] == "original" and recorded["verification"]["trained_relative_diff"] > 0


@pytest.mark.parametrize("arch,quant_type,double_quant,dtype", [
    ("llama", "nf4", True, "float32"), ("llama", "fp4", False, "bfloat16"), ("gpt2", "nf4", True, "float32")])
def test_4bit_dequantisation_is_what_bitsandbytes_loads(arch, quant_type, double_quant, dtype, tiny_model):
    """The merge quantises each weight itself, shard by shard: it must equal a 4-bit load bit for bit."""
    import bitsandbytes as bnb

    from peftctl.model import load_model
    from peftctl.recipe.schema import ModelSection, QuantizationSection

    model_dir = tiny_model(arch)
    quant = {"bits": 4, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": "float32"}
    recipe = SimpleNamespace(model=ModelSection(name=str(model_dir), dtype=dtype),
                             quantization=QuantizationSection(**quant))
    loaded = load_model(recipe, torch.device("cpu"))
    layers = {f"{name}.weight": m for name, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    from transformers import AutoConfig

    quantized = quantized_weights(AutoConfig.from_pretrained(str(model_dir)), quant)
    assert set(quantized) == set(layers) and layers
    transform = weight_transform({**quant, "load_dtype": getattr(torch, dtype)}, quantized)
    checkpoint = SafetensorsFolder(model_dir)
    for key, tensor in checkpoint.read(list(layers)).items():
        loaded_weight = bnb.functional.dequantize_4bit(layers[key].weight.data, layers[key].weight.quant_state)
        ours = transform(key, tensor)
        assert torch.equal(ours.T if quantized[key] else ours, loaded_weight), key


def test_8bit_adapters_merge_onto_the_int8_weights(base, trained, tmp_path):
    """bitsandbytes' 8-bit layers hold int8 weights (row-wise absmax) and also quantise their inputs at run time.
    The merge takes the int8 weights exactly and says that the input quantisation cannot be merged."""
    import bitsandbytes as bnb

    quant = {"bits": 8, "compute_dtype": "float32"}
    run = trained("int8", base, method={"targets": "all-linear"}, quantization=quant)
    int8_model = adapter_on_base(run, quant)
    for name, module in int8_model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and name.endswith("layers.0.mlp.down_proj.base_layer"):
            key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
            w = SafetensorsFolder(base).read([key])[key]
            theirs = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
            assert torch.equal(dequantized_weight(w, {"bits": 8}), theirs)

    report = merge_adapter(run, tmp_path / "merged")
    assert report.verification["relative_diff"] < 1e-5
    assert any("quantise their inputs at run time" in note for note in report.notes)
    merge_adapter(run, tmp_path / "original", from_quantized="original")
    real = logits(int8_model)
    onto_int8 = relative(logits(load_plain(tmp_path / "merged")), real)
    onto_original = relative(logits(load_plain(tmp_path / "original")), real)
    assert onto_int8 < onto_original  # closer to what was trained, though not equal (inputs are quantised)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_half_precision_output_checks_the_arithmetic_before_rounding(method, base, trained, tmp_path):
    run = trained(method, base, method=dict(METHOD_SECTIONS[method]))
    report = merge_adapter(run, tmp_path / "bf16", dtype="bfloat16", max_shard_size="200KB")
    check = report.verification
    assert check["float32_relative_diff"] < 1e-5 and check["relative_diff"] < check["tolerance"]
    assert check["written_relative_diff"] < 1e-6 and check["rounding_relative_diff"] > 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    merged = SafetensorsFolder(tmp_path / "bf16")
    assert len(merged.files) > 1 and {code for code, _ in merged.meta.values()} == {"BF16"}


# --- the output folder -------------------------------------------------------------------------------------------


PLAIN_LOAD = """
import sys
sys.modules["peftctl"] = None  # as if peftctl were not installed: any import of it fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(input_ids=ids).logits.float()
torch.save(out, sys.argv[3])
chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(model.dtype, type(model).__name__, len(chat) > 0)
"""


def test_merged_folder_loads_with_plain_transformers(base, trained, tmp_path):
    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    out = tmp_path / "merged"
    merge_adapter(run, out, max_shard_size="300KB")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", MERGE_INFO} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SafetensorsFolder(base).meta)
    assert (out / "chat_template.jinja").read_text() == (run / "adapter" / "chat_template.jinja").read_text()

    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch.float32 LlamaForCausalLM True" in done.stdout
    assert relative(torch.load(tmp_path / "logits.pt"), logits(adapter_on_base(run))) < 1e-5


def run_merge_command(adapter, out, **options) -> int:
    """`peftctl merge` in-process (the subprocess tests cover the wiring): its exit code."""
    from peftctl.cli import merge as command
    from peftctl.cli.errors import run_guarded

    kwargs = {"base": None, "dtype": None, "verify": True, "max_shard_size": "5GB",
              "from_quantized": "dequantized", "force": False, **options}
    return run_guarded(lambda: command.run(str(adapter), str(out), **kwargs))


def test_the_command_prints_both_figures_and_guards_out(base, trained, tmp_path, capsys):
    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    out = tmp_path / "merged"
    assert run_merge_command(run, out) == 0
    printed = capsys.readouterr().out
    assert "merged vs base + adapter: " in printed and "merged vs base: " in printed
    assert (out / "model.safetensors").exists() and (out / MERGE_INFO).exists()

    again = run_cli("merge", str(run), "--out", str(out))  # refused before any weight is read: a quick subprocess
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr

    before = (out / MERGE_INFO).read_text()
    assert run_merge_command(run, out, force=True, dtype="float16") == 0
    assert "for float16" in capsys.readouterr().out
    assert (out / MERGE_INFO).read_text() != before and not leftovers(out)


def test_train_with_output_merge_writes_a_verified_merged_model(base, trained):
    run = trained("lora-merge", base, method=dict(METHOD_SECTIONS["lora"]), output={"merge": True})
    recorded = json.loads((run / "merged" / MERGE_INFO).read_text())
    assert recorded["verification"]["relative_diff"] < 1e-5
    assert relative(logits(load_plain(run / "merged")), logits(adapter_on_base(run))) < 1e-5


# --- verification failures and interrupted merges leave nothing --------------------------------------------------


def test_an_adapter_that_does_nothing_fails_verification(base, tmp_path, capsys):
    adapter = fresh_lora(base, tmp_path / "fresh")
    out = tmp_path / "merged"
    assert run_merge_command(adapter, out) == 1
    stderr = capsys.readouterr().err
    assert "equals the base model" in stderr and "nothing written" in stderr
    assert not out.exists() and not leftovers(out)

    merge_adapter(adapter, out, verify=False)  # --no-verify writes it anyway, and says it was not verified
    assert json.loads((out / MERGE_INFO).read_text())["verification"] is None


def test_a_failed_merge_leaves_nothing_and_keeps_the_old_out(base, trained, tmp_path, monkeypatch):
    import peftctl.merge as merge

    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    out = tmp_path / "merged"

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure after every shard was written")

    monkeypatch.setattr(merge, "verify_merge", broken)
    with pytest.raises(RuntimeError, match="injected"):
        merge_adapter(run, out)
    assert not out.exists() and not leftovers(out)

    out.mkdir()
    (out / "keep.txt").write_text("the previous merge")
    with pytest.raises(RuntimeError, match="injected"):
        merge_adapter(run, out, force=True)
    assert (out / "keep.txt").read_text() == "the previous merge" and not leftovers(out)

    monkeypatch.undo()
    stale = tmp_path / f".merged.merging-{2**22 + 12345}-abc"  # left by a merge killed with SIGKILL
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    merge_adapter(run, out, force=True)
    assert not stale.exists() and not (out / "keep.txt").exists() and not leftovers(out)


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft_type,method", [("PREFIX_TUNING", "prefix_tuning"), ("PROMPT_TUNING", "prompt_tuning"),
                                              ("P_TUNING", "p_tuning"), (None, "adapter")])
def test_methods_that_cannot_merge_are_refused(peft_type, method, tmp_path):
    from peftctl.methods.registry import METHODS

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    if peft_type:
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    else:
        (adapter / "bottleneck_config.json").write_text(json.dumps({"method": "adapter"}))
    with pytest.raises(InvalidInput) as refused:
        merge_adapter(adapter, tmp_path / "out")
    assert METHODS[method].cannot_merge in refused.value.message
    assert refused.value.hint == METHODS[method].instead_of_merge
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bottleneck_adapter_with_exit_2(base, trained, tmp_path):
    run = trained("bottleneck", base, method={"name": "adapter", "_replace": True})
    done = run_cli("merge", str(run), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "cannot be merged" in done.stderr and "peftctl generate" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_base_that_does_not_fit_is_refused(base, tiny_model, trained, tmp_path):
    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    other = tiny_model("llama", hidden=32, heads=2, kv_heads=1, intermediate=64)
    with pytest.raises(InvalidInput, match="does not fit"):
        merge_adapter(run, tmp_path / "out", base=str(other))
    with pytest.raises(InvalidInput, match="not a model folder|no such folder"):
        merge_adapter(run, tmp_path / "out", base=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_missing_or_damaged_adapter_is_refused(base, trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    with pytest.raises(InvalidInput, match="no such adapter folder"):
        merge_adapter(tmp_path / "nowhere", tmp_path / "out")

    adapter = tmp_path / "partial"
    shutil.copytree(run / "adapter", adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    dropped = sorted(k for k in state if "lora_B" in k)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(InvalidInput, match="no lora_B"):
        merge_adapter(adapter, tmp_path / "out")

    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(InvalidInput, match="damaged adapter weights"):
        merge_adapter(adapter, tmp_path / "out")

    with pytest.raises(InvalidInput, match="--from-quantized"):
        merge_adapter(run, tmp_path / "out", from_quantized="nf4")
    with pytest.raises(InvalidInput, match="--dtype"):
        merge_adapter(run, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("300kb") == 300_000
    assert parse_shard_size(1234) == 1234 and parse_shard_size("1.5MB") == 1_500_000
    for bad in ("five", "-1GB", "0", "12XB"):
        with pytest.raises(InvalidInput):
            parse_shard_size(bad)


# --- memory: one shard at a time (slow: a 1.2 GB model is written for it) ----------------------------------------


# The peak RSS of the merge process itself. Not ru_maxrss: Linux carries the parent's peak into a child's
# ru_maxrss across fork + exec (and pytest holds the model it just wrote); VmHWM belongs to the process's own memory.
MEASURED = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("MAXRSS_KB", line.split()[1], file=sys.stderr)
atexit.register(peak)
sys.argv = ["peftctl", *sys.argv[1:]]
from peftctl.cli.app import main
main()
"""


def random_lora(base: Path, out: Path, r: int = 8) -> Path:
    """A LoRA adapter with random A and B on every projection, written without loading the base."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, (_, shape) in SafetensorsFolder(base).meta.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1], generator=generator)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r, generator=generator) * 1e-3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(out))
    return out


def measured_merge(*args: str, wait: bool = True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", MEASURED, "merge", *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    peak = int(done.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0]) * 1024
    return done, peak


def wait_for_a_written_shard(process, out: Path) -> None:
    """Until the merge `process` has bytes in a shard of its own staging folder (it is named after its pid)."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(p.stat().st_size > 0 for p in out.parent.glob(f".{out.name}.merging-{process.pid}-*/*")):
            return
        time.sleep(0.05)
    raise AssertionError("the merge wrote no shard (or ended) before it could be interrupted")


@pytest.mark.slow
def test_peak_memory_stays_near_one_shard(tiny_model, base, trained, tmp_path):
    """A 1.2 GB float32 model in shards of ~200-300 MB: merging and verifying it must not hold it whole. The same
    command on a tiny model gives the cost of the imports (torch, transformers, peft, bitsandbytes)."""
    big = tiny_model("llama", hidden=1024, heads=8, kv_heads=8, intermediate=22784, layers=4,
                     max_shard_size="300MB")
    checkpoint = SafetensorsFolder(big)
    model_bytes = sum(p.stat().st_size for p in checkpoint.files)
    largest = max(p.stat().st_size for p in checkpoint.files)
    assert model_bytes > 1.1e9 and largest >= 200e6 and len(checkpoint.files) >= 4
    adapter = random_lora(big, tmp_path / "adapter")
    out = tmp_path / "merged"

    # Killed mid-way (SIGKILL: no cleanup runs at all): nothing at --out; the next merge removes the remains.
    process = measured_merge(str(adapter), "--out", str(out), wait=False)
    wait_for_a_written_shard(process, out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and leftovers(out)

    # SIGTERM: the merge stops with 143 and removes its own staging folder (and the killed one's).
    process = measured_merge(str(adapter), "--out", str(out), wait=False)
    wait_for_a_written_shard(process, out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and not out.exists() and not leftovers(out)

    _, baseline = measured_merge(str(trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))), "--out",
                                 str(tmp_path / "tiny"))
    done, peak = measured_merge(str(adapter), "--out", str(out), "--max-shard-size", "300MB")
    assert "merged vs base + adapter:" in done.stdout and not leftovers(out)
    extra = peak - baseline
    print(f"model {model_bytes / 1e6:.0f} MB, largest shard {largest / 1e6:.0f} MB, imports {baseline / 1e6:.0f} MB, "
          f"merge + verify peak {peak / 1e6:.0f} MB (+{extra / 1e6:.0f} MB)")
    assert extra < 2 * largest and extra < 0.5 * model_bytes


# --- the tolerance follows from rounding, and a wrong merge still fails ------------------------------------------


def strong_lora(model: Path, out: Path, std: float = 0.5) -> Path:
    """The issue's adapter: stock peft, r 16, alpha 64, all-linear, B drawn with std 0.5 (a large effect)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_plain(model), LoraConfig(r=16, lora_alpha=64, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std)
    peft_model.save_pretrained(str(out))
    return out


def test_a_strong_adapter_merged_in_bfloat16_verifies(base, tmp_path):
    """Rounding the merged weights to bf16 moves the logits of a strong adapter by ~0.1: that is the tolerance (plus
    float32 noise), while the arithmetic before rounding and the written shards are checked at float32 noise."""
    adapter = strong_lora(base, tmp_path / "strong")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="bfloat16", base=str(base), device="cpu")
    check = report.verification
    assert check["relative_diff"] > 0.05  # the fixed tolerance of old refused this correct merge
    assert check["relative_diff"] <= check["tolerance"] <= check["rounding_relative_diff"] + 2.01e-4
    assert check["float32_relative_diff"] < 1e-4 and check["written_relative_diff"] < 1e-6
    from peft import PeftModel

    stock = PeftModel.from_pretrained(load_plain(base), str(adapter)).merge_and_unload().state_dict()
    ours = SafetensorsFolder(tmp_path / "merged")
    for key, tensor in ours.read(list(ours.meta)).items():  # stock peft's merge, rounded to bf16: the same weights
        theirs = stock[key].to(torch.bfloat16)
        ulp = theirs.float().abs() * 2.0**-7
        assert ((tensor.float() - theirs.float()).abs() <= ulp).all(), key  # at most one bf16 step apart
        assert (tensor == theirs).float().mean() > 0.99, key


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_cpu_verification_skips_the_rounded_pass_only_when_the_shards_match(base_dtype, tiny_model, tmp_path,
                                                                            monkeypatch):
    """On the CPU the written shards are compared bit for bit with the merge rounded in memory during the exact pass;
    then the rounded pass (the same weights through the same model) is not run, and every figure is the one the
    full rounded pass gives. A float32 base rounds after the deltas, a bfloat16 one reuses the exact weights."""
    import peftctl.merge.verify as verify

    model = tiny_model("llama", dtype=base_dtype) if base_dtype != "float32" else tiny_model("llama", shards=3)
    adapter = strong_lora(model, tmp_path / "strong", std=0.05)
    passes = []
    real_stream = verify.stream_logits
    monkeypatch.setattr(verify, "stream_logits", lambda *a, **k: passes.append(1) or real_stream(*a, **k))
    fast = merge_adapter(adapter, tmp_path / "fast", dtype="bfloat16", base=str(model), device="cpu").verification
    assert len(passes) == 4  # with adapter, base, merged, exact: no rounded pass
    assert fast["written_relative_diff"] == 0 and fast["rounding_relative_diff"] > 0

    class Mismatch(verify.WrittenCheck):  # as if one tensor differed: the rounded pass runs
        def compare(self, key, tensor, exact):
            super().compare(key, tensor, exact)
            self.differing.append(key)

    passes.clear()
    monkeypatch.setattr(verify, "WrittenCheck", Mismatch)
    full = merge_adapter(adapter, tmp_path / "full", dtype="bfloat16", base=str(model), device="cpu").verification
    assert len(passes) == 5
    for name in ("relative_diff", "float32_relative_diff", "rounding_relative_diff", "written_relative_diff",
                 "tolerance", "base_relative_diff"):
        assert full[name] == fast[name], name  # the same weights through the same model: the same logits


def test_a_wrong_merge_fails_verification(base, tmp_path, monkeypatch, capsys):
    """A merge whose arithmetic is off (here: the delta applied twice in the written shards) is refused with exit 1
    even in bf16, where rounding alone moves the logits a lot: the shards must equal the merge rounded in memory."""
    import peftctl.merge.write as write

    adapter = strong_lora(base, tmp_path / "strong", std=0.05)
    real = write.apply_deltas
    monkeypatch.setattr(write, "apply_deltas", lambda tensor, deltas: real(real(tensor, deltas), deltas))
    out = tmp_path / "merged"
    assert run_merge_command(adapter, out, dtype="bfloat16", base=str(base), device="cpu") == 1
    assert "verification failed" in capsys.readouterr().err and not out.exists() and not leftovers(out)


# --- model families: names from the model's own mapping ----------------------------------------------------------


FAMILIES = {
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     tie_word_embeddings=False),
    "phi3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, pad_token_id=0),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                   num_kv_heads=2),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    # experts stored (experts, in, out) (is_transposed) and fused on disk too, with expert biases
    "gpt_oss": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    # square expert matrices (2 x 32 = 64 = hidden), a dense first layer, a shared expert, low-rank attention
    "deepseek_v3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}
MOE = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3")
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def family_model(family: str, folder: Path) -> Path:
    """A tiny random model of `family` from transformers' own config, saved as save_pretrained saves it (for MoE:
    one tensor per expert, as on the hub)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
                                  **FAMILIES[family])
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


def family_lora(model: Path, family: str, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    moe = family in MOE
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                        target_parameters=EXPERT_PARAMETERS if moe else None)
    torch.manual_seed(1)
    peft_model = get_peft_model(load_plain(model), config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft_model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_merges_like_stock_peft(family, tmp_path):
    """GPT-NeoX's head is embed_out and its qkv fused, Phi-3 fuses qkv_proj, Falcon ties its head, Mixtral,
    Qwen3-MoE and DeepSeek-V3 hold experts as fused 3-D parameters stored one tensor per expert, gpt-oss stores them
    fused and transposed: the merge reads each name from the model, folds expert adapters (peft's
    target_parameters) and verifies; stock peft's merge_and_unload computes the same logits, and the merged folder
    keeps the base's tensor names."""
    from peft import PeftModel

    model = family_model(family, tmp_path / "base")
    adapter = family_lora(model, family, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", base=str(model), device="cpu")
    check = report.verification
    assert check["relative_diff"] < 1e-5 and check["base_relative_diff"] > 1e-4, check
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    stock = PeftModel.from_pretrained(load_plain(model), str(adapter)).merge_and_unload().eval()
    merged = load_plain(tmp_path / "merged")
    assert relative(logits(merged, ids), logits(stock, ids)) < 1e-5
    assert relative(logits(merged, ids), logits(load_plain(model), ids)) > 1e-4
    assert set(SafetensorsFolder(tmp_path / "merged").meta) == set(SafetensorsFolder(model).meta)
    if family in MOE:
        changed = [k for k, (code, _) in SafetensorsFolder(model).meta.items() if ".experts." in k and "bias" not in k]
        before, after = SafetensorsFolder(model).read(changed), SafetensorsFolder(tmp_path / "merged").read(changed)
        assert all(not torch.equal(before[k], after[k]) for k in changed)  # every expert got its delta


def test_the_gpu_pipeline_writes_what_the_cpu_path_writes(base, trained, tmp_path, monkeypatch):
    """The GPU path's reader (the file's own header offsets, chunked reads) and writer (chunks through two
    buffers, a writer thread) run on the CPU too, without pinning: with tiny chunks, so that tensors span several,
    the shards come out byte for byte as the plain path writes them."""
    import peftctl.merge.device as device
    from peftctl.merge.deltas import collect_deltas
    from peftctl.merge.write import write_merged_shards

    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    checkpoint = SafetensorsFolder(base)
    deltas = collect_deltas(adapter, "lora", config, checkpoint)
    monkeypatch.setattr(device, "CHUNK", 1000)
    written = {}
    for pipeline in (False, True):
        out = tmp_path / str(pipeline)
        out.mkdir()
        shards, merged = write_merged_shards(checkpoint, out, deltas, None, torch.bfloat16, 300_000, lambda m: None,
                                             pipeline=pipeline)
        assert shards > 1 and merged == len(deltas)
        written[pipeline] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert written[True] == written[False]
    # The verification's reader on the GPU: the same tensors as safetensors' own, read through the buffers.
    piped = device.PipelinedCheckpoint(checkpoint, device.GpuPipeline(torch.device("cpu")))
    keys = list(checkpoint.meta)
    theirs, ours = checkpoint.read(keys), piped.read(keys)
    assert all(torch.equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype for k in keys)


def test_a_failing_writer_stops_the_merge(base, trained, tmp_path, monkeypatch):
    """A disk error on the writer thread (here: a write that raises) reaches the caller, which waits for no
    buffer the writer will never free."""
    import peftctl.merge.device as device
    from peftctl.merge.safetensors_io import ShardWriter
    from peftctl.merge.write import write_merged_shards

    monkeypatch.setattr(device, "CHUNK", 1000)

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "append", full)
    for pipeline in (False, True):
        out = tmp_path / str(pipeline)
        out.mkdir()
        with pytest.raises(OSError, match="No space"):
            write_merged_shards(SafetensorsFolder(base), out, {}, None, torch.float32, 10**9, lambda m: None,
                                pipeline=pipeline)


# --- on the GPU (run on the GPU machine with -m gpu) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantized", [False, True])
def test_a_gpu_merge_writes_what_the_cpu_merge_writes(quantized, base, trained, tmp_path):
    """--device cuda (bitsandbytes' GPU kernels for NF4) gives the CPU merge's weights: the same bf16 tensors up to
    a last-bit difference in a few (float32 arithmetic on another device), and it verifies on the GPU."""
    if quantized:
        run = trained("qlora-gpu", base, method={"name": "qlora", "targets": "all-linear"}, quantization=QLORA)
    else:
        run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    on_gpu = merge_adapter(run, tmp_path / "gpu", dtype="bfloat16", device="cuda")
    # The CPU merge in a process of its own, as a user runs it: training here applied liger's RoPE kernel, which
    # it patches into transformers' module for the whole process, and Triton cannot run on CPU tensors.
    cpu_merge = subprocess.run([sys.executable, "-m", "peftctl", "merge", str(run), "--out", str(tmp_path / "cpu"),
                                "--dtype", "bfloat16", "--device", "cpu"], capture_output=True, text=True)
    assert cpu_merge.returncode == 0, cpu_merge.stderr
    assert on_gpu.device.startswith("cuda") and on_gpu.verification["device"].startswith("cuda")
    assert on_gpu.verification["written_relative_diff"] < 1e-4
    gpu, cpu = SafetensorsFolder(tmp_path / "gpu"), SafetensorsFolder(tmp_path / "cpu")
    assert set(gpu.meta) == set(cpu.meta)
    for key, tensor in gpu.read(list(gpu.meta)).items():
        theirs = cpu.read([key])[key]
        if not quantized:  # NF4 on another device may pick the neighbouring code for a value on a boundary
            assert ((tensor.float() - theirs.float()).abs() <= theirs.float().abs() * 2.0**-7 + 1e-6).all(), key
        assert (tensor == theirs).float().mean() > 0.99, key


def test_device_choices_are_checked_before_any_weight_is_read(base, trained, tmp_path, capsys):
    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    assert run_merge_command(run, tmp_path / "out", device="tpu") == 2
    assert "--device tpu: expected auto, cuda, cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_merge_command(run, tmp_path / "out", device="cuda") == 2
        assert "torch sees no GPU" in capsys.readouterr().err
        report = merge_adapter(run, tmp_path / "auto")  # auto: the CPU here, and the report says so
        assert report.device == "cpu" and report.verification["device"] == "cpu"
    assert not (tmp_path / "out").exists()


def test_the_merge_computes_in_full_float32_and_restores_the_setting(base, trained, tmp_path, monkeypatch):
    """A training process may switch TF32 on (10-bit mantissa in float32 matmuls on the GPU): the merge and its
    verification run at full float32 precision, and the caller's setting comes back afterwards."""
    import peftctl.merge.write as write

    run = trained("lora", base, method=dict(METHOD_SECTIONS["lora"]))
    seen = []
    real = write.apply_deltas
    monkeypatch.setattr(write, "apply_deltas", lambda *a: seen.append(torch.get_float32_matmul_precision()) or real(*a))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        merge_adapter(run, tmp_path / "merged", device="cpu")
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
