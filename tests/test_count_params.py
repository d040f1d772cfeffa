"""`peftctl count-params`: exact figures from config.json alone, equal to peft's own count on real models (16-bit,
4-bit, 8-bit) and to a closed form, and to what `peftctl train` prints."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REAL_PROCESS, REPO, recipe_dict, run_cli

CONFIGS = Path(__file__).parent / "data" / "configs"
LLAMA3_8B = CONFIGS / "llama-3-8b"
LLAMA3_8B_BASE = 8_030_261_248  # Meta-Llama-3-8B's parameters


def cli(*args: str):
    """The CLI in this process (no second import of torch): exit code, stdout and stderr apart."""
    from peftctl.cli.app import app

    return CliRunner().invoke(app, list(args))


def count_json(*args: str) -> dict:
    result = cli("count-params", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def parse(text: str, base: Path | None = None):
    from peftctl.recipe.loader import parse_recipe

    return parse_recipe(text, "recipe.yaml", base or Path.cwd(), check_paths=False)


def recipe_text(model: Path | str, method: dict, quantization: dict | None = None, dtype: str = "float32") -> str:
    raw = {"model": {"name": str(model), "dtype": dtype}, "method": method,
           "dataset": {"path": "unused.jsonl"}, "output": {"dir": "unused"}}
    if quantization:
        raw["quantization"] = quantization
    return yaml.safe_dump(raw, sort_keys=False)


# --- the known figures, through the command line --------------------------------------------------------------

KNOWN = [
    # (config, flags, trainable, all params)
    ("llama-3-8b", ["--r", "16", "--targets", "q_proj,v_proj"], 6_815_744, 8_037_076_992),
    ("llama-3-8b", ["--r", "16", "--targets", "q_proj,k_proj,v_proj,o_proj"], 13_631_488, 8_043_892_736),
    ("llama-2-7b", ["--r", "16", "--targets", "all-linear"], 39_976_960, 6_778_392_576),
    ("llama-3-8b", ["--r", "16", "--targets", "all-linear"], 41_943_040, LLAMA3_8B_BASE + 41_943_040),
    # QLoRA: the 4-bit base counts as peft counts it (packed weights as the weights they hold)
    ("llama-3-8b", ["--method", "qlora", "--r", "16", "--targets", "all-linear"], 41_943_040,
     LLAMA3_8B_BASE + 41_943_040),
    ("llama-3-8b", ["--bits", "8", "--r", "16", "--targets", "q_proj,v_proj"], 6_815_744, 8_037_076_992),
    # DoRA adds a magnitude per output feature: 32 x (4096 + 1024)
    ("llama-3-8b", ["--r", "16", "--targets", "q_proj,v_proj", "--set", "method.use_dora=true"], 6_979_584,
     8_037_240_832),
    ("llama-3-8b", ["--method", "ia3"], 524_288, LLAMA3_8B_BASE + 524_288),
    # prefix: virtual tokens x layers x 2 x head_dim x kv_heads
    ("llama-3-8b", ["--method", "prefix_tuning", "--num-virtual-tokens", "20"], 1_310_720,
     LLAMA3_8B_BASE + 1_310_720),
    ("llama-3-8b", ["--method", "prefix_tuning", "--set", "method.projection=true", "--set",
                    "method.projection_hidden_size=512"], 34_165_248, LLAMA3_8B_BASE + 34_165_248),
    ("llama-3-8b", ["--method", "prompt_tuning", "--num-virtual-tokens", "20"], 81_920, LLAMA3_8B_BASE + 81_920),
    ("llama-3-8b", ["--method", "p_tuning"], 50_425_856, LLAMA3_8B_BASE + 50_425_856),
    ("llama-3-8b", ["--method", "p_tuning", "--set", "method.encoder_hidden_size=128"], 1_151_232,
     LLAMA3_8B_BASE + 1_151_232),
    ("llama-3-8b", ["--method", "p_tuning", "--set", "method.encoder_hidden_size=128", "--set",
                    "method.encoder_type=lstm"], 5_923_072, LLAMA3_8B_BASE + 5_923_072),
    # bottleneck adapters, Houlsby: 2 per layer of 2*h*m + m + h
    ("llama-3-8b", ["--method", "adapter", "--set", "method.placement=houlsby", "--set", "method.bottleneck=64"],
     64 * (2 * 4096 * 64 + 64 + 4096), LLAMA3_8B_BASE + 64 * (2 * 4096 * 64 + 64 + 4096)),
]


@pytest.mark.parametrize("config,flags,trainable,total", KNOWN, ids=[" ".join([c] + f) for c, f, *_ in KNOWN])
def test_known_figures(config, flags, trainable, total):
    flags = (["--method", "lora"] if "--method" not in flags else []) + flags
    out = count_json("--model", str(CONFIGS / config), *flags)
    assert (out["trainable"], out["total"]) == (trainable, total)
    assert sum(row["parameters"] for row in out["modules"]) == trainable


def test_text_output_is_peft_line_then_table():
    result = cli("count-params", "--model", str(LLAMA3_8B), "--method", "lora", "--r", "16",
                 "--targets", "q_proj,v_proj")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "trainable params: 6,815,744 || all params: 8,037,076,992 || trainable%: 0.0848"
    table = result.stdout
    q_row = next(line for line in lines if "q_proj" in line)
    assert "32" in q_row and "4,096 -> 4,096" in q_row and "131,072" in q_row and "4,194,304" in q_row
    v_row = next(line for line in lines if "v_proj" in line)
    assert "4,096 -> 1,024" in v_row and "81,920" in v_row
    assert "6,815,744" in table.split("total")[-1]


def test_one_4096_layer_at_rank_16():
    out = count_json("--model", str(LLAMA3_8B), "--method", "lora", "--r", "16", "--targets", "q_proj")
    (row,) = out["modules"]
    assert (row["module"], row["layers"], row["in_features"], row["out_features"]) == ("q_proj", 32, 4096, 4096)
    assert row["parameters_each"] == 131_072 == 16 * (4096 + 4096)
    assert row["tensors"] == {"lora_A": [16, 4096], "lora_B": [4096, 16]}


def test_recipe_form_equals_flag_form(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("configs/llama-3-8b", {"name": "lora", "r": 16, "targets": ["q_proj", "v_proj"]}))
    (tmp_path / "configs").symlink_to(CONFIGS)  # a relative model path resolves from the recipe's folder
    from_recipe = count_json(str(recipe))
    from_flags = count_json("--model", str(LLAMA3_8B), "--r", "16", "--targets", "q_proj,v_proj")
    assert from_recipe["line"] == from_flags["line"]
    assert from_recipe["modules"] == from_flags["modules"]


def test_json_is_all_that_stdout_holds():
    result = cli("count-params", "--model", str(LLAMA3_8B), "--method", "ia3", "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)  # would fail on any extra line
    assert out["method"]["name"] == "ia3" and out["line"].startswith("trainable params: 524,288 ||")
    assert [row["module"] for row in out["modules"]] == ["k_proj", "v_proj", "down_proj"]


def test_gpt2_modules_of_the_same_name_are_told_apart():
    out = count_json("--model", str(CONFIGS / "gpt2"), "--r", "8", "--targets", "all-linear")
    names = [row["module"] for row in out["modules"]]
    assert names == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    h, i, layers = 768, 3072, 12
    assert out["trainable"] == layers * 8 * ((h + 3 * h) + (h + h) + (h + i) + (i + h))


# --- errors -----------------------------------------------------------------------------------------------------

def test_targets_that_match_nothing_cite_the_recipe_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model:
          name: {LLAMA3_8B}
        method:
          name: lora
          targets: [q_proj, qproj]
        dataset: {{path: unused.jsonl}}
        output: {{dir: unused}}
        """))
    result = cli("count-params", str(recipe))
    assert result.exit_code == 2
    assert f"{recipe}:5:3: method.targets: qproj matches no module" in result.stderr
    assert "linear layers of this model: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" \
        in result.stderr


def test_targets_that_match_nothing_with_flags():
    result = cli("count-params", "--model", str(CONFIGS / "gpt2"), "--method", "lora")
    assert result.exit_code == 2
    assert "--method lora (its default targets): method.targets: q_proj, k_proj, v_proj, o_proj match no module" \
        in result.stderr
    assert "c_attn, c_fc, c_proj" in result.stderr


@pytest.mark.parametrize("flags,expected", [
    (["--r", "0"], "--r 0: method.r: "),
    (["--bits", "3"], "--bits 3: quantization.bits: 3 is not allowed; expected 4 or 8"),
    (["--method", "loar"], "--method loar: method.name: unknown method 'loar'; did you mean lora?"),
    (["--method", "prompt_tuning", "--r", "8"], "--r 8: method.r: not a key of method prompt_tuning"),
    (["--method", "qlora", "--bits", "8"], "--bits 8: quantization.bits: qlora is LoRA on a 4-bit base"),
])
def test_bad_flags_read_like_recipe_errors(flags, expected):
    result = cli("count-params", "--model", str(LLAMA3_8B), *flags)
    assert result.exit_code == 2
    assert expected in result.stderr


def test_recipe_and_method_flags_together_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(LLAMA3_8B, {"name": "lora"}))
    result = cli("count-params", str(recipe), "--r", "8")
    assert result.exit_code == 2 and "--set method.r=32" in result.stderr
    assert cli("count-params").exit_code == 2


def test_missing_or_broken_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("count-params", "--model", str(empty))
    assert result.exit_code == 2 and "not a model folder (no config.json)" in result.stderr

    result = cli("count-params", "--model", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "no such folder" in result.stderr

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 8}))
    result = cli("count-params", "--model", str(odd))
    assert result.exit_code == 2 and "cannot be read by transformers" in result.stderr

    (odd / "config.json").write_text("{ not json")
    result = cli("count-params", "--model", str(odd))
    assert result.exit_code == 2 and "config.json" in result.stderr

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = cli("count-params", "--model", str(bert))
    assert result.exit_code == 2, result.stderr


def test_hub_id_offline_says_what_was_tried(tmp_path):
    """The real process, with an empty hub cache and HF_HUB_OFFLINE=1: a clean exit 2 naming what was tried."""
    result = run_cli("count-params", "--model", "meta-llama/Meta-Llama-3-8B", "--method", "lora",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    err = " ".join(result.stderr.split())
    assert "model meta-llama/Meta-Llama-3-8B not found" in err
    assert "a local folder named 'meta-llama/Meta-Llama-3-8B'" in err and "hub cache" in err
    assert "HF_HUB_OFFLINE is set" in err


def test_hub_id_reads_config_json_from_the_hub_cache(tmp_path, monkeypatch):
    """The hub path is real: hf_hub_download finds config.json in a (hand-made) cache, offline."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--llama-3-8b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((LLAMA3_8B / "config.json").read_text())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = count_json("--model", "acme/llama-3-8b", "--r", "16", "--targets", "q_proj,v_proj")
    assert (out["trainable"], out["total"]) == (6_815_744, 8_037_076_992)
    assert out["model"] == "acme/llama-3-8b"


def test_as_a_real_process_without_bitsandbytes():
    """`python -m peftctl count-params` never imports bitsandbytes (nor the torch compiler it pulls in), even for
    a 4-bit recipe with a memory plan: the meta model is never quantised. The figures and the plan are those of
    the same command run where bitsandbytes is importable (this process)."""
    import subprocess

    args = ["count-params", "--model", str(LLAMA3_8B), "--method", "qlora", "--targets", "all-linear", "--memory",
            "--gpu-memory", "24GiB", "--json"]
    proc = subprocess.run([sys.executable, "-c", REAL_PROCESS, *args], capture_output=True, text=True,
                          cwd=str(REPO), env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.stderr.endswith("EXIT=0 HEAVY="), proc.stderr
    assert proc.stderr == "EXIT=0 HEAVY="  # and nothing else on stderr: bitsandbytes' kernel-loading chatter included
    out = json.loads(proc.stdout)
    assert (out["trainable"], out["total"]) == (41_943_040, LLAMA3_8B_BASE + 41_943_040)
    assert out == count_json(*args[1:-1])


# --- 70B: no storage --------------------------------------------------------------------------------------------

def test_70b_counts_without_allocating():
    """The count builds the model on the meta device: no tensor with storage bigger than a handful of numbers is
    ever made (one 70B layer's MLP weight alone is 235M numbers, its LoRA adapters 200M)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from peftctl.params import count_for_recipe

    class LargestRealTensor(TorchDispatchMode):
        """Records the element count of the largest tensor with storage that any torch operation returns."""
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
            self.numel = max([self.numel, *sizes])
            return out

    text = (f"model: {{name: {CONFIGS / 'llama-3-70b'}}}\nmethod: {{name: qlora, r: 16, targets: all-linear}}\n"
            "dataset: {path: unused}\noutput: {dir: unused}\n")
    with LargestRealTensor() as seen:
        counted = count_for_recipe(parse(text).recipe)
    assert counted.count.line() == "trainable params: 207,093,760 || all params: 70,760,800,256 || trainable%: 0.2927"
    tensors = list(counted.model.parameters()) + list(counted.model.buffers())
    assert {t.device.type for t in tensors} == {"meta"}  # every parameter and buffer, base and adapter
    assert seen.numel < 10_000, seen.numel


# --- equal to peft on real (tiny) models, and to a closed form ----------------------------------------------------

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt2", "phi3"]
H, LAYERS, HEADS, KV, HD, INTER, VOCAB = 64, 3, 4, 2, 16, 96, 320


def tiny_config(arch: str):
    from transformers import AutoConfig

    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                    n_positions=128, bos_token_id=0, eos_token_id=0)
    sizes = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV, intermediate_size=INTER, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma":
        sizes["head_dim"] = 2 * HD  # Gemma's head_dim is its own (256 with hidden 2048 in Gemma-2B)
    if arch in ("gemma", "qwen2"):
        sizes["tie_word_embeddings"] = True
    return AutoConfig.for_model(arch, **sizes)


def features(arch: str) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a decoder layer, in closed form."""
    if arch == "gpt2":
        return {"c_attn": (H, 3 * H), "attn.c_proj": (H, H), "c_fc": (H, INTER), "mlp.c_proj": (INTER, H)}
    hd = 2 * HD if arch == "gemma" else HD
    if arch == "phi3":
        return {"qkv_proj": (H, (HEADS + 2 * KV) * hd), "o_proj": (HEADS * hd, H), "gate_up_proj": (H, 2 * INTER),
                "down_proj": (INTER, H)}
    return {"q_proj": (H, HEADS * hd), "k_proj": (H, KV * hd), "v_proj": (H, KV * hd), "o_proj": (HEADS * hd, H),
            "gate_proj": (H, INTER), "up_proj": (H, INTER), "down_proj": (INTER, H)}


def kv_width(arch: str) -> int:
    return H if arch == "gpt2" else KV * (2 * HD if arch == "gemma" else HD)


def methods_for(arch: str) -> dict[str, tuple[dict, int]]:
    """method section -> its trainable parameters in closed form, for `arch`."""
    f = features(arch)
    lin = list(f)
    attention = [n for n in lin if n in ("q_proj", "v_proj", "c_attn", "qkv_proj")]
    r, nv, enc = 4, 5, 16
    lora = LAYERS * sum(r * (i + o) for i, o in f.values())
    lora_attn = LAYERS * sum(r * (f[n][0] + f[n][1]) for n in attention)
    dora = lora_attn + LAYERS * sum(f[n][1] for n in attention)
    if arch == "gpt2":
        ia3_section = {"name": "ia3", "targets": ["c_attn", "c_proj"], "feedforward_targets": ["c_proj"]}
        ia3 = LAYERS * (3 * H + H + INTER)  # c_attn's output; both c_proj scale their input (they share the name)
    elif arch == "phi3":
        ia3_section = {"name": "ia3", "targets": ["qkv_proj", "down_proj"], "feedforward_targets": ["down_proj"]}
        ia3 = LAYERS * (f["qkv_proj"][1] + INTER)
    else:
        ia3_section = {"name": "ia3"}  # k_proj, v_proj outputs; down_proj's input
        ia3 = LAYERS * (f["k_proj"][1] + f["v_proj"][1] + INTER)
    td = kv_width(arch)
    lstm = 2 * (4 * enc * H + 4 * enc * enc + 8 * enc) + 2 * (4 * enc * 2 * enc + 4 * enc * enc + 8 * enc)
    m = 8
    return {
        "lora-all": ({"name": "lora", "r": r, "targets": "all-linear"}, lora),
        "lora-attn": ({"name": "lora", "r": r, "targets": [n.split(".")[-1] for n in attention]}, lora_attn),
        "dora": ({"name": "lora", "r": r, "targets": [n.split(".")[-1] for n in attention], "use_dora": True}, dora),
        "ia3": (ia3_section, ia3),
        "prefix": ({"name": "prefix_tuning", "num_virtual_tokens": nv}, nv * LAYERS * 2 * td),
        "prefix-projection": ({"name": "prefix_tuning", "num_virtual_tokens": nv, "projection": True,
                               "projection_hidden_size": enc},
                              nv * td + (td * enc + enc) + (enc * LAYERS * 2 * td + LAYERS * 2 * td)),
        "prompt": ({"name": "prompt_tuning", "num_virtual_tokens": nv}, nv * H),
        "p-tuning-mlp": ({"name": "p_tuning", "num_virtual_tokens": nv, "encoder_hidden_size": enc},
                         nv * H + (H * enc + enc) + (enc * enc + enc) + (enc * H + H)),
        "p-tuning-lstm": ({"name": "p_tuning", "num_virtual_tokens": nv, "encoder_hidden_size": enc,
                           "encoder_type": "lstm"},
                          nv * H + lstm + (2 * enc * 2 * enc + 2 * enc) + (2 * enc * H + H)),
        "houlsby": ({"name": "adapter", "placement": "houlsby", "bottleneck": m}, 2 * LAYERS * (2 * H * m + m + H)),
        "pfeiffer": ({"name": "adapter", "placement": "pfeiffer", "reduction_factor": 8},
                     LAYERS * (2 * H * (H // 8) + H // 8 + H)),
    }


@pytest.fixture(scope="module")
def config_folders(tmp_path_factory):
    """arch -> a folder with config.json only (what count-params reads) and one with weights (what peft counts)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("count-configs")
    folders = {}
    for arch in ARCHS:
        config = tiny_config(arch)
        config_only, weights = root / f"{arch}-config", root / f"{arch}-weights"
        config.save_pretrained(config_only)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(weights)
        folders[arch] = (config_only, weights)
    return folders


def peft_count(model) -> tuple[int, int]:
    """peft's own figures; our bottleneck adapter is no PeftModel, so peft's method is applied to it directly."""
    from peft import PeftModel

    return PeftModel.get_nb_trainable_parameters(model)


def real_model(folder: Path, recipe, quantized: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model

    if quantized:
        model = load_model(recipe, torch.device("cpu"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
    return runtime.attach(model, recipe.method, AttachContext(tokenizer_path=str(folder)))


CASES = [(arch, name) for arch in ARCHS for name in methods_for(arch)]


@pytest.mark.parametrize("arch,case", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_count_equals_peft_and_closed_form(arch, case, config_folders):
    from peftctl.params import count_for_recipe, count_parameters

    config_only, weights = config_folders[arch]
    section, closed_form = methods_for(arch)[case]
    counted = count_for_recipe(parse(recipe_text(config_only, section)).recipe)
    model = real_model(weights, parse(recipe_text(weights, section)).recipe)
    assert counted.count.trainable == closed_form
    assert (counted.count.trainable, counted.count.total) == peft_count(model)
    assert count_parameters(model) == counted.count
    assert sum(row["parameters"] for row in counted.modules) == closed_form


QUANTIZED = [(arch, case, bits) for arch in ARCHS for case in ("lora-all", "dora", "ia3", "prefix", "prompt",
                                                                 "houlsby") for bits in (4,)]
QUANTIZED += [("llama", case, 8) for case in ("lora-all", "ia3", "prompt", "houlsby")]
QUANTIZED += [("llama", "lora-all", "4-no-double-quant"), ("gpt2", "lora-attn", 8)]


@pytest.mark.parametrize("arch,case,bits", QUANTIZED, ids=[f"{a}-{c}-{b}bit" for a, c, b in QUANTIZED])
def test_count_equals_peft_on_a_quantised_model(arch, case, bits, config_folders):
    """A real bitsandbytes model on the CPU: peft counts its packed 4-bit weights as the weights they hold; the
    meta model, never quantised, gives the same figures."""
    from peftctl.params import count_for_recipe, count_parameters

    config_only, weights = config_folders[arch]
    section, closed_form = methods_for(arch)[case]
    quant = {"bits": 4, "double_quant": False} if bits == "4-no-double-quant" else {"bits": bits}
    counted = count_for_recipe(parse(recipe_text(config_only, section, quant)).recipe)
    model = real_model(weights, parse(recipe_text(weights, section, quant)).recipe, quantized=True)
    packed = [p for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")]
    assert packed, "the model was not quantised"
    assert (counted.count.trainable, counted.count.total) == peft_count(model)
    assert count_parameters(model) == counted.count
    assert counted.count.trainable == closed_form


# --- equal to what `peftctl train` prints --------------------------------------------------------------------------

TRAINED = {
    "lora": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
    "ia3": {"name": "ia3"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
    "adapter": {"name": "adapter", "placement": "houlsby", "bottleneck": 8},
}


@pytest.mark.parametrize("method", list(TRAINED))
def test_count_equals_the_line_train_prints(method, tiny_model, tmp_path):
    """One training step through the loop itself; the line it prints is count-params' first line."""
    from rich.console import Console

    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    recipe = tmp_path / "recipe.yaml"
    raw = recipe_dict(tiny_model("llama"), out=tmp_path / "run", method={**TRAINED[method], "_replace": True},
                      training={"max_steps": 1})
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    buffer = io.StringIO()
    train(load_recipe(str(recipe)), TrainOptions(force=True, log_format="json"),
          console=Console(file=buffer, width=200))
    printed = next(line for line in buffer.getvalue().splitlines() if line.startswith("trainable params:"))
    result = cli("count-params", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == printed
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert f"{run['params']['trainable']:,d}" in printed
