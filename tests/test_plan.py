"""The memory plan: its weights equal the storage of real (quantised) models; its activations equal what autograd
saves, counted with saved-tensor hooks on tiny models of every family; its decisions (checkpointing, fits,
remedies) follow from those figures. Peaks on a GPU are measured by scripts/measure_memory.py."""

from __future__ import annotations

import dataclasses
import json
import sys
import weakref
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_count_params import LLAMA3_8B, cli, parse

GiB = 1024 ** 3
ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "phi3"]
H, LAYERS, HEADS, KV, INTER, VOCAB = 128, 3, 4, 2, 344, 512


def tiny_config(arch: str):
    from transformers import AutoConfig

    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                    n_positions=512, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                    eos_token_id=0)
    sizes = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV, intermediate_size=INTER, max_position_embeddings=512, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    if arch in ("gemma", "gemma2"):
        sizes.update(head_dim=H // HEADS, tie_word_embeddings=True)
    if arch == "gemma2":
        sizes.update(query_pre_attn_scalar=H // HEADS, sliding_window=256)
    if arch == "qwen2":
        sizes["tie_word_embeddings"] = True
    return AutoConfig.for_model(arch, **sizes)


def make_recipe(model: str, method: dict, *, quantization: dict | None = None, dtype: str = "bfloat16",
                micro_batch_size: int = 2, max_length: int = 96, checkpointing="auto"):
    raw = {"model": {"name": model, "dtype": dtype}, "method": method,
           "dataset": {"path": "unused.jsonl", "max_length": max_length},
           "training": {"micro_batch_size": micro_batch_size, "gradient_checkpointing": checkpointing},
           "output": {"dir": "unused"}}
    if quantization:
        raw["quantization"] = quantization
    return parse(yaml.safe_dump(raw, sort_keys=False)).recipe


@pytest.fixture(autouse=True)
def plain_path(monkeypatch):
    """Plans for the plain path (no liger-kernel, no LoRA dropout kernel) unless a test says otherwise, wherever the
    suite runs."""
    from peftctl import fast_path

    monkeypatch.setattr(fast_path, "liger_available", lambda: False)
    monkeypatch.setattr(fast_path, "triton_available", lambda: False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """arch -> a model folder with random weights (config.json beside them)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("plan-models")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def shape_and_setting(recipe, checkpointing: bool = False, device: str = "cuda", fast_path: bool = False):
    from peftctl import plan
    from peftctl.params import count_for_recipe

    counted = count_for_recipe(recipe)
    shape = plan.model_shape(counted.model, counted.config, recipe)
    setting = plan.setting_for(recipe, shape, checkpointing, fast_path=fast_path, device=device)
    setting.device = device
    return shape, setting


# --- weights ---------------------------------------------------------------------------------------------------

def storage_bytes(model) -> int:
    """Bytes the parameters really hold, bitsandbytes' quantisation constants included, each storage once."""
    seen: dict[int, int] = {}

    def add(t):
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
                add(state.offset)
        add(getattr(p, "SCB", None))
    return sum(seen.values())


WEIGHTS = [(arch, quant) for arch in ("llama", "qwen2", "gpt2", "phi3")
           for quant in (None, {"bits": 4}, {"bits": 4, "double_quant": False}, {"bits": 8})]
WEIGHTS += [("llama", {"bits": 4, "upcast_embeddings": True})]


@pytest.mark.parametrize("arch,quant", WEIGHTS, ids=[f"{a}-{json.dumps(q)}" for a, q in WEIGHTS])
def test_weight_bytes_equal_the_real_storage(arch, quant, folders):
    import torch

    from peftctl import plan
    from peftctl.model import load_model

    recipe = make_recipe(str(folders[arch]), {"name": "lora", "r": 4, "targets": "all-linear"}, quantization=quant)
    shape, setting = shape_and_setting(recipe)
    model = load_model(recipe, torch.device("cpu"))
    assert plan.weight_bytes(shape, setting) == storage_bytes(model)


def test_nf4_weights_of_llama3_8b_in_closed_form():
    from peftctl import plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": "qlora", "targets": "all-linear"})
    shape, setting = shape_and_setting(recipe)
    h, i, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    quantised = 0
    for out_f, in_f in per_layer * layers:
        n = out_f * in_f
        quantised += n // 2 + n // 64 + 4 * (n // 64 // 256) + 64 + 1028  # nf4, 8-bit absmax, fp32 absmax2, codes
    unquantised = 2 * (2 * vocab * h + (2 * layers + 1) * h)  # bf16 embeddings, lm_head and norms
    assert plan.weight_bytes(shape, setting) == quantised + unquantised
    assert 5.2 * GiB < quantised + unquantised < 5.4 * GiB  # ~0.516 bytes per quantised weight


# --- activations: what autograd saves ----------------------------------------------------------------------------

def saved_bytes(model, inputs: dict, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass after one forward (parameters excluded, each
    storage once, tensors saved and released again during the forward not counted)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs, use_cache=False)
    alive = {ptr: n for ref, ptr, n in saved if ref() is not None}
    del out
    return sum(alive.values())


def measured_and_planned(folder: Path, arch: str, method: dict, *, dtype="bfloat16", quant=None, b=2, s=96,
                         skip_casts: bool = False, fused: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from peftctl import plan
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model
    from peftctl.plan import constants
    from peftctl.train.kernels import skip_adapter_input_casts

    recipe = make_recipe(str(folder), method, quantization=quant, dtype=dtype, micro_batch_size=b, max_length=s)
    shape, setting = shape_and_setting(recipe, device="cpu")
    setting.adapter_input_casts = not skip_casts  # peft's default here (the loop turns it off under CUDA autocast)
    setting.triton = fused  # the dropout kernel runs only in the fused branch
    if quant:
        model = load_model(recipe, torch.device("cpu"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        for p in model.parameters():
            p.requires_grad_(False)
    model = runtime.attach(model, recipe.method, AttachContext(tokenizer_path=str(folder)))
    model.train()
    if skip_casts:
        skip_adapter_input_casts(model)
    if fused:  # the loop's fused LoRA branch (with the dropout kernel where the setting has triton)
        from peftctl.train.fused_lora import fuse_lora_layers

        fuse_lora_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # every layer saves as the plan assumes: the first one too (its input needs a gradient only with prompts)
    base.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB - 1, (b, s))
    if recipe.method.name in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        mask = torch.ones_like(ids)
        mask[0, -7:] = 0  # padding: transformers builds a mask, as for any batch of unequal rows
        inputs = {"input_ids": ids, "attention_mask": mask}
    else:  # two packed documents per row, told apart by position_ids
        inputs = {"input_ids": ids, "position_ids": torch.cat([torch.arange(40), torch.arange(s - 40)]).repeat(b, 1)}
    measured = saved_bytes(model, inputs, autocast=setting.autocast is not None)

    act = plan.activation_bytes(shape, setting)
    tokens = b * act["sequence"]
    a = 2 if setting.autocast else 4
    final_norm = (a if shape.layer_norm else constants.NORM_SAVED_BYTES) * shape.hidden
    planned = (shape.layers * act["per_layer"] + final_norm + a * shape.vocab * shape.logit_softcap) * tokens
    if setting.autocast and recipe.method.name not in ("ia3", "prompt_tuning"):
        planned += constants.AUTOCAST_COPY_BYTES * shape.trainable
    return measured, planned


METHODS = {
    "lora-all": {"name": "lora", "r": 8, "dropout": 0.0, "targets": "all-linear"},
    "lora-dropout": {"name": "lora", "r": 8, "dropout": 0.1, "targets": "all-linear"},
    "dora": {"name": "lora", "r": 8, "dropout": 0.0, "use_dora": True, "targets": "all-linear"},
    "ia3": {"name": "ia3"},
    "houlsby": {"name": "adapter", "placement": "houlsby", "bottleneck": 16},
    "prompt": {"name": "prompt_tuning", "num_virtual_tokens": 10},
    "p-tuning": {"name": "p_tuning", "num_virtual_tokens": 10, "encoder_hidden_size": 32},
    "prefix": {"name": "prefix_tuning", "num_virtual_tokens": 10},
}
IA3 = {"gpt2": {"name": "ia3", "targets": ["c_attn", "c_fc", "c_proj"], "feedforward_targets": ["c_proj"]},
       "phi3": {"name": "ia3", "targets": ["qkv_proj", "down_proj"], "feedforward_targets": ["down_proj"]}}
ACTIVATIONS = [(arch, name) for arch in ARCHS for name in METHODS if not (arch == "gpt2" and name == "prefix")]


@pytest.mark.parametrize("arch,name", ACTIVATIONS, ids=[f"{a}-{n}" for a, n in ACTIVATIONS])
def test_activations_equal_what_autograd_saves(arch, name, folders):
    """bf16 weights under autocast, as the loop trains; the plan reproduces the CPU kernels here (device='cpu':
    dropout keeps a float tensor, LayerNorm stays in bf16), the rest is the same code on a GPU."""
    method = IA3.get(arch, METHODS[name]) if name == "ia3" else METHODS[name]
    measured, planned = measured_and_planned(folders[arch], arch, method)
    assert planned == pytest.approx(measured, rel=0.04)


NO_CASTS = [(a, n) for a in ("llama", "mistral", "gpt2") for n in ("lora-all", "lora-dropout", "dora")
            if (a, n) != ("gpt2", "dora")]  # DoRA on GPT-2's Conv1D keeps ~14% more there: not modelled


@pytest.mark.parametrize("arch,name", NO_CASTS, ids=[f"{a}-{n}" for a, n in NO_CASTS])
def test_activations_without_peft_input_casts(arch, name, folders):
    """What the loop does under autocast (kernels.skip_adapter_input_casts): adapters read the bf16 input itself,
    and siblings without dropout share it; o_proj reads the attention output SDPA keeps anyway (its kernels write
    a (batch, seq, heads, head_dim) buffer). Not phi3 here: on a CPU, its sliced q/k/v send SDPA to a kernel whose
    output o_proj has to copy (2 x hidden more per token and layer than planned; the CUDA kernels do not)."""
    measured, planned = measured_and_planned(folders[arch], arch, METHODS[name], skip_casts=True)
    assert planned == pytest.approx(measured, rel=0.04)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activations_with_the_lora_dropout_kernel(arch, folders, monkeypatch):
    """The loop's fused branch with LoRA's dropout kernel (run by Triton's interpreter here): each layer keeps its
    input itself, siblings share it, no dropped copies or masks -- as planned by the rule the branch asks."""
    pytest.importorskip("triton")
    import os

    from peftctl import fast_path

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): tests/test_gpu.py covers the kernel there")
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(fast_path, "triton_available", lambda: True)  # plain_path turned it off
    measured, planned = measured_and_planned(folders[arch], arch, METHODS["lora-dropout"], skip_casts=True,
                                             fused=True)
    assert planned == pytest.approx(measured, rel=0.04)
    # and the kernel is what made the difference: torch's dropout in the same branch keeps a copy and a mask per
    # layer (bool on the CPU in native_dropout, where peft's nn.Dropout keeps a float noise tensor: not planned here)
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", {"cuda"})
    without, _ = measured_and_planned(folders[arch], arch, METHODS["lora-dropout"], skip_casts=True, fused=True)
    assert without > 1.1 * measured


def test_dropout_kernel_on_llama3_8b_keeps_the_no_dropout_adapter_bytes():
    """QLoRA all-linear, dropout 0.05, 4 x 2048 (benchmark case 3): with the kernel the adapters keep what they keep
    without dropout (q/k/v's input once, gate/up's once, down's, and h); without it a bf16 copy and a bool mask of
    each of the 7 inputs."""
    from peftctl import plan

    def adapter(dropout, triton):
        recipe = make_recipe(str(LLAMA3_8B), {"name": "qlora", "r": 16, "dropout": dropout, "targets": "all-linear"},
                             quantization={"bits": 4}, micro_batch_size=4, max_length=2048)
        shape = shape_and_setting(recipe)[0]
        setting = plan.setting_for(recipe, shape, False, fast_path=True, triton=triton)
        return plan.activation_bytes(shape, setting)["adapter"], plan.dropout_kernel_layers(shape, setting)

    assert adapter(0.05, True) == (adapter(0.0, False)[0], 7 * 32)
    h, i = 4096, 14336
    h_bytes = 7 * 2 * 16
    assert adapter(0.0, False)[0] == 2 * h + 2 * h + 2 * i + h_bytes  # q/k/v once, gate/up once, down; o: SDPA's
    assert adapter(0.05, False) == ((2 + 1) * (6 * h + i) + h_bytes, 0)  # copy + mask of all 7


def test_plan_assumes_the_dropout_kernel_where_triton_imports(monkeypatch):
    from peftctl import fast_path, plan

    def recipe(dropout):
        return make_recipe(str(LLAMA3_8B), {"name": "qlora", "r": 16, "dropout": dropout, "targets": "all-linear"},
                           quantization={"bits": 4}, micro_batch_size=4, max_length=2048)

    monkeypatch.setattr(fast_path, "triton_available", lambda: True)
    # The kernel is slower than torch's dropout: taken only where the run fits with it and not without it.
    roomy = plan.plan_memory(recipe(0.05), card=card(139), fast_path=True)
    assert not any("dropout kernel" in n for n in roomy.notes) and not roomy.setting.checkpointing
    with_kernel = plan.plan_memory(recipe(0.05), card=card(56), fast_path=True)
    assert any("dropout kernel assumed on 224 layers" in n for n in with_kernel.notes)
    assert with_kernel.fits and not with_kernel.setting.checkpointing and with_kernel.setting.triton
    assert roomy.peak > with_kernel.peak + 15 * GiB
    tight = plan.plan_memory(recipe(0.05), card=card(24), fast_path=True)  # checkpointing, and then no kernel
    assert tight.setting.checkpointing and not any("dropout kernel" in n for n in tight.notes)
    monkeypatch.setattr(fast_path, "triton_available", lambda: False)
    without = plan.plan_memory(recipe(0.05), card=card(56), fast_path=True)
    assert not any("dropout kernel" in n for n in without.notes) and without.setting.checkpointing

    def never():
        raise AssertionError("triton imported for a plan without LoRA dropout")

    monkeypatch.setattr(fast_path, "triton_available", never)
    plan.plan_memory(recipe(0.0), card=card(139), fast_path=True)


@pytest.mark.parametrize("dtype,quant,name", [
    ("float32", None, "lora-all"), ("float32", None, "ia3"), ("float32", None, "houlsby"),
    ("bfloat16", {"bits": 4}, "lora-all"), ("bfloat16", {"bits": 4}, "lora-dropout"),
    ("bfloat16", {"bits": 4}, "houlsby"), ("bfloat16", {"bits": 8}, "lora-all"),
])
def test_activations_in_float32_and_on_quantised_bases(dtype, quant, name, folders):
    measured, planned = measured_and_planned(folders["llama"], "llama", METHODS[name], dtype=dtype, quant=quant)
    # float32 on a CPU: its SDPA kernel keeps one tensor less than the CUDA kernels the plan counts
    assert planned == pytest.approx(measured, rel=0.06 if dtype == "float32" else 0.04)


def test_llama3_8b_bytes_per_token_in_closed_form():
    """bf16 LoRA r16 on q,k,v,o without dropout, 4 x 2048 packed rows: the plan's figures written out."""
    from peftctl import fast_path, plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": "lora", "r": 16, "dropout": 0.0}, micro_batch_size=4,
                         max_length=2048)
    shape, setting = shape_and_setting(recipe)
    assert setting.attention == "varlen" or fast_path.torch_version() < fast_path.VARLEN_MIN_TORCH
    varlen = plan.activation_bytes(shape, dataclasses.replace(setting, attention="varlen"))["attention"]
    kv = 8 * 128 * (32 // 8 if fast_path.varlen_repeats_kv() else 1)
    assert varlen == 2 * (4096 + kv + kv + 4096) + 4 * 32  # q, k, v, output; logsumexp; no mask
    setting = dataclasses.replace(setting, attention="sdpa")  # SDPA with its mask: where varlen is refused
    act = plan.activation_bytes(shape, setting)
    h, i, heads, seq = 4096, 14336, 32, 2048
    norms = 2 * 4 * h  # two RMSNorms keep an fp32 copy of their input
    attention = 2 * (h + h + h + h) + 4 * heads + 2 * seq  # q, repeated k and v, output; logsumexp; float mask
    mlp = 3 * 2 * i  # gate, act(gate), up
    lora = 2 * h + 4 * 2 * 16  # q,k,v read one input, kept once (no fp32 copies under autocast); o reads the
    #                             attention output SDPA keeps anyway; A's outputs
    assert act["per_layer"] == norms + attention + mlp + lora == 164_096
    components = {c.name: c.bytes for c in plan.estimate(shape, setting, "lora")}
    tokens = 4 * 2048
    assert components["logits and loss"] == 12 * tokens * 128256
    assert components["base weights"] == 2 * 8_030_261_248
    assert components["adapter weights"] == 4 * 13_631_488
    assert components["AdamW states"] == 8 * 13_631_488
    checkpointed = dataclasses.replace(setting, checkpointing=True)
    with_checkpointing = {c.name: c.bytes for c in plan.estimate(shape, checkpointed, "lora")}
    assert with_checkpointing["activations"] < components["activations"] / 10
    # checkpointing keeps each layer's bf16 input (plus the layer being recomputed)
    assert with_checkpointing["activations"] >= 32 * 2 * h * tokens


# --- against GPU measurements ------------------------------------------------------------------------------------

H200_BENCHMARKS = [
    # BENCHMARKS.md, 2026-11-28, one H200, peftctl's loop with liger-kernel: (case, method, micro-batch, SDPA mask,
    # checkpointing, measured peak GiB). Cases 1 and 3: rows of one whole example (no mask); 2: packed SFT-like
    # rows; 4: padded rows.
    ("1 bf16 LoRA q,k,v,o 4x2048", "lora", ["q_proj", "k_proj", "v_proj", "o_proj"], 4, False, False, 50.51),
    ("2 same, packed rows", "lora", ["q_proj", "k_proj", "v_proj", "o_proj"], 4, True, False, 54.53),
    ("3 QLoRA all-linear 4x2048", "qlora", "all-linear", 4, False, False, 57.89),
    ("4 QLoRA all-linear 1x2048 checkpointed", "qlora", "all-linear", 1, True, True, 6.89),
]


@pytest.mark.parametrize("case,name,targets,rows,mask,checkpointing,measured", H200_BENCHMARKS,
                         ids=[c[0] for c in H200_BENCHMARKS])
def test_plan_reproduces_the_h200_benchmarks(case, name, targets, rows, mask, checkpointing, measured):
    """The fast path's peaks measured on the GPU (LoRA r16, alpha 32, dropout 0.05, accumulation 1)."""
    from peftctl import plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": name, "r": 16, "alpha": 32, "dropout": 0.05, "targets": targets},
                         micro_batch_size=rows, max_length=2048, checkpointing=checkpointing)
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"gradient_accumulation": 1})})
    shape, setting = shape_and_setting(recipe, checkpointing, fast_path=True)
    assert setting.fast_kernels and setting.fused_loss and not setting.adapter_input_casts
    setting.attention_mask = mask
    setting.attention = "sdpa"  # measured before packed rows had the varlen kernel
    setting.input_embeddings = "gpu"  # as measured (before model.input_embeddings existed)
    peak = sum(c.bytes for c in plan.estimate(shape, setting, name)) / GiB
    assert peak == pytest.approx(measured, rel=0.03)


def case4_plan(input_embeddings: str, *, world_size: int = 1, quantization: bool = True):
    from peftctl import plan

    method = {"name": "qlora" if quantization else "lora", "r": 16, "alpha": 32, "dropout": 0.05,
              "targets": "all-linear"}
    recipe = make_recipe(str(LLAMA3_8B), method, micro_batch_size=1, max_length=2048, checkpointing=True)
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"gradient_accumulation": 1})})
    shape, setting = shape_and_setting(recipe, True, fast_path=True)
    setting = dataclasses.replace(setting, input_embeddings=input_embeddings, world_size=world_size,
                                  engine="ddp" if world_size > 1 else None)
    return {c.name: c.bytes for c in plan.estimate(shape, setting, method["name"])}


def test_case4_input_embedding_in_host_memory_brings_the_plan_under_6_gib():
    """Issue 21: QLoRA all-linear 1 x 2048 checkpointed. auto moves the bf16 input embedding (128256 x 4096) off the
    GPU; the plan follows the loop's rule (peftctl/placement.py)."""
    table = 128256 * 4096 * 2
    on_gpu, auto, cpu = case4_plan("gpu"), case4_plan("auto"), case4_plan("cpu")
    assert "input embedding" not in on_gpu and auto == cpu
    assert auto["input embedding"] == 0
    assert on_gpu["base weights"] - auto["base weights"] == table
    assert sum(on_gpu.values()) - sum(auto.values()) == table
    assert sum(auto.values()) / GiB < 6.0 < sum(on_gpu.values()) / GiB
    # auto keeps it on the GPU where memory is not what the run is short of, or where it is not verified
    assert "input embedding" not in case4_plan("auto", quantization=False)
    assert "input embedding" not in case4_plan("auto", world_size=2)
    assert "input embedding" not in case4_plan("cpu", world_size=2)


# --- decisions ---------------------------------------------------------------------------------------------------

def card(gib: float):
    from peftctl.plan import Card

    return Card(int(gib * GiB), f"a {gib:g} GiB card")


def test_needs_checkpointing_only_when_the_plan_without_it_does_not_fit(monkeypatch):
    from peftctl import plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": "lora", "r": 16}, micro_batch_size=4, max_length=2048)
    without = plan.plan_memory(recipe, card=card(64), checkpointing=False)
    assert without.fits is False and without.other.fits  # 64 GiB: only with checkpointing
    for size, expected in ((141, False), (64, True), (24, True)):
        monkeypatch.setattr(plan.card, "local_card", lambda device=None, size=size: card(size))
        assert plan.needs_checkpointing(recipe, device=None) is expected
    prefix = make_recipe(str(LLAMA3_8B), {"name": "prefix_tuning"}, micro_batch_size=4, max_length=2048)
    assert plan.needs_checkpointing(prefix, device=None) is False  # it cannot checkpoint at all
    monkeypatch.setattr(plan.card, "local_card", lambda device=None: plan.Card(None, "no GPU"))
    assert plan.needs_checkpointing(recipe, device=None) is False


def test_auto_resolves_by_the_plan_and_explicit_settings_stay():
    from peftctl import plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": "lora"}, micro_batch_size=4, max_length=2048)
    assert plan.plan_memory(recipe, card=card(141)).setting.checkpointing is False
    small = plan.plan_memory(recipe, card=card(40))
    assert small.setting.checkpointing is True and small.fits and small.other.setting.checkpointing is False
    assert "auto -> on" in small.notes[0]
    forced = make_recipe(str(LLAMA3_8B), {"name": "lora"}, micro_batch_size=4, max_length=2048, checkpointing=False)
    assert plan.plan_memory(forced, card=card(141)).setting.checkpointing is False


def test_remedies_come_in_order_until_it_fits():
    from peftctl import plan

    recipe = make_recipe(str(LLAMA3_8B), {"name": "lora", "targets": "all-linear"}, micro_batch_size=8,
                         max_length=4096, checkpointing=False)
    result = plan.plan_memory(recipe, card=card(24))
    changes = [change for change, _ in result.remedies]
    assert changes[0] == "training.gradient_checkpointing: true"
    assert changes[1].startswith("training.micro_batch_size: 1 with gradient_accumulation: 32")
    assert changes[2].startswith("dataset.max_length: ")
    peaks = [after.peak for _, after in result.remedies if after is not None]
    assert peaks == sorted(peaks, reverse=True)  # every step helps
    assert result.remedies[-1][1].fits
    # a 12 GiB card needs the 4-bit base too
    tiny_card = plan.plan_memory(recipe, card=card(12))
    assert any("qlora" in change for change, _ in tiny_card.remedies)


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * GiB), ("24 GiB", 24 * GiB), ("80GB", 80 * 10 ** 9), ("81559MiB", 81559 * 1024 ** 2),
    ("24", 24 * GiB), ("1.5T", int(1.5 * 1024 * GiB)), ("16g", 16 * GiB)])
def test_gpu_memory_sizes(text, expected):
    from peftctl.plan import parse_gpu_memory

    assert parse_gpu_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-4GiB", "24 parsecs", "0"])
def test_bad_gpu_memory_is_exit_2(text):
    result = cli("count-params", "--model", str(LLAMA3_8B), "--memory", "--gpu-memory", text)
    assert result.exit_code == 2 and "--gpu-memory" in result.stderr


def test_memory_in_json():
    result = cli("count-params", "--model", str(LLAMA3_8B), "--method", "qlora", "--targets", "all-linear",
                 "--memory", "--gpu-memory", "12GiB", "--json")
    assert result.exit_code == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    names = [c["name"] for c in memory["components"]]
    assert names[:4] == ["base weights", "adapter weights", "gradients", "AdamW states"]
    assert "activations" in names and "logits and loss" in names
    assert memory["peak_bytes"] == sum(c["bytes"] for c in memory["components"])
    assert memory["needed_bytes"] > memory["peak_bytes"]
    assert memory["setting"]["bits"] == 4 and memory["setting"]["checkpointing"] is True  # auto, for 12 GiB
    assert memory["fits"] is False and memory["remedies"]
    assert memory["card"] == {"name": "--gpu-memory 12GiB", "bytes": 12 * GiB}


def test_memory_text_says_what_to_change():
    result = cli("count-params", "--model", str(LLAMA3_8B), "--r", "16", "--memory", "--gpu-memory", "24GiB",
                 "--set", "training.micro_batch_size=8")
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "memory plan: 8 x 2048 tokens per micro-batch, bfloat16 base, gradient checkpointing on" in out
    assert "does not fit --gpu-memory 24GiB" in out and "Change first: 1. training.micro_batch_size:" in out
    assert "with gradient checkpointing off: peak" in out


def test_memory_without_a_gpu_says_so():
    result = cli("count-params", "--model", str(LLAMA3_8B), "--memory")
    assert result.exit_code == 0, result.stderr
    assert "no GPU found here (give --gpu-memory" in " ".join(result.stdout.split())


def test_plan_of_every_shipped_recipe(tmp_path):
    """The shipped recipes name hub models; with their config.json in a local cache they all plan."""
    from peftctl import plan
    from peftctl.params import count_for_recipe
    from peftctl.recipe.loader import load_recipe

    for path in sorted((REPO / "recipes").glob("llama3-8b-*.yaml")):
        # a config folder has no tokenizer: chat recipes name a template (the plan does not depend on it)
        loaded = load_recipe(str(path), [f"model.name={LLAMA3_8B}", "model.chat_template=llama3"], check_paths=False)
        result = plan.plan_memory(loaded.recipe, count_for_recipe(loaded.recipe), card=card(80))
        assert 5 * GiB < result.peak < 200 * GiB, path.name


# --- the measuring script ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_measure_memory_tiny_runs(tmp_path):
    result = run_cli_script(["--tiny", "--work", str(tmp_path / "work"), "--only", "lora-2x128,qlora-1x128-ckpt"],
                            env={"OUT": str(tmp_path / "out")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lora-2x128" in result.stdout and "qlora-1x128-ckpt" in result.stdout
    report = json.loads((tmp_path / "out" / "memory_plan_vs_measured.json").read_text())
    assert [case["case"] for case in report["cases"]] == ["lora-2x128", "qlora-1x128-ckpt"]
    assert all(case["exit_code"] == 0 for case in report["cases"])
    assert report["cases"][1]["plan"]["setting"]["checkpointing"] is True


def run_cli_script(args: list[str], env: dict):
    import os
    import subprocess

    return subprocess.run([sys.executable, str(REPO / "scripts" / "measure_memory.py"), *args], capture_output=True,
                          text=True, timeout=900, cwd=str(REPO), env={**os.environ, **env})


def test_measure_memory_cases_are_planned_for_one_h200():
    """The GPU cases: both seq lengths, both micro-batches, checkpointing both ways, two held out; all fit."""
    sys.path.insert(0, str(REPO / "scripts"))
    import measure_memory
    from peftctl import plan

    cases = measure_memory.CASES
    assert {c.max_length for c in cases if not c.held_out} == {1024, 2048}
    assert {c.micro_batch_size for c in cases if not c.held_out} == {1, 4}
    assert {(c.method["name"], c.checkpointing) for c in cases if not c.held_out} == {
        ("lora", True), ("lora", False), ("qlora", True), ("qlora", False)}
    assert sum(c.held_out for c in cases) == 2
    for case in cases:
        raw = case.recipe(LLAMA3_8B, Path("unused.jsonl"), Path("unused"), steps=3)
        recipe = parse(yaml.safe_dump(raw)).recipe
        result = plan.plan_memory(recipe, card=card(139), checkpointing=case.checkpointing)
        assert result.fits, case.name


def test_micro_batch_and_length_shorthands(capsys):
    """count_params.run's micro_batch_size / max_length (for app.py's --micro-batch-size / --max-length) are
    --set training.micro_batch_size / dataset.max_length."""
    from peftctl.cli import count_params

    common = dict(model=str(LLAMA3_8B), method="qlora", r=None, alpha=None, targets=None, bits=None,
                  num_virtual_tokens=None, json_output=True, memory=True, gpu_memory="24GiB")
    count_params.run(None, [], **common, micro_batch_size=1, max_length=4096)
    shorthand = json.loads(capsys.readouterr().out)["memory"]
    count_params.run(None, ["training.micro_batch_size=1", "dataset.max_length=4096"], **common)
    with_set = json.loads(capsys.readouterr().out)["memory"]
    assert shorthand == with_set
    assert (shorthand["setting"]["micro_batch_size"], shorthand["setting"]["max_length"]) == (1, 4096)


def test_the_loop_s_memory_mode_follows_the_plan(monkeypatch):
    """train/loop.py asks plan.memory_mode: explicit checkpointing never takes the dropout kernel (nor asks the
    plan); auto takes the kernel exactly where the plan does, on the card it is given."""
    import torch

    from peftctl import fast_path, plan
    from peftctl.plan import card as cards, verdict
    from peftctl.train.loop import _memory_mode

    monkeypatch.setattr(fast_path, "triton_available", lambda: True)
    monkeypatch.setattr(fast_path, "liger_available", lambda: True)

    def recipe(checkpointing, keep="auto"):
        return make_recipe(str(LLAMA3_8B), {"name": "qlora", "r": 16, "dropout": 0.05, "targets": "all-linear"},
                           quantization={"bits": 4, "keep_dequantized": keep}, micro_batch_size=4, max_length=2048,
                           checkpointing=checkpointing)

    cuda = torch.device("cuda")
    monkeypatch.setattr(verdict, "plan_memory", lambda *a, **k: (_ for _ in ()).throw(AssertionError("planned")))
    assert _memory_mode(recipe(True), cuda) == (True, False, False)
    assert _memory_mode(recipe(True, keep=True), cuda) == (True, False, True)
    assert _memory_mode(recipe("auto"), torch.device("cpu")) == (False, False, False)
    assert _memory_mode(recipe("auto", keep=True), torch.device("cpu")) == (False, False, True)
    monkeypatch.undo()
    monkeypatch.setattr(fast_path, "triton_available", lambda: True)
    monkeypatch.setattr(fast_path, "liger_available", lambda: True)
    # (checkpointing, dropout kernel, kept matrices): the 8B's 13 GiB of matrices are kept on an H200 (the plan
    # then needs about 83 GiB of 139), not on an 80 GiB card (the run fits, but with them it would need more than
    # 90% of the card), nor where the dropout kernel or checkpointing is what makes the run fit
    for gib, expected in ((139, (False, False, True)), (80, (False, False, False)), (56, (False, True, False)),
                         (24, (True, False, False))):
        monkeypatch.setattr(cards, "local_card", lambda device=None, gib=gib: card(gib))
        assert _memory_mode(recipe("auto"), cuda) == expected, gib
    monkeypatch.setattr(cards, "local_card", lambda device=None: card(139))
    assert _memory_mode(recipe("auto", keep=False), cuda) == (False, False, False)
    monkeypatch.setattr(cards, "local_card", lambda device=None: card(56))
    assert _memory_mode(recipe(False), cuda) == (False, True, False)
    assert plan.memory_mode is verdict.memory_mode


def test_kept_4bit_matrices_are_planned_and_the_first_remedy(monkeypatch):
    """quantization.keep_dequantized in the plan: the kept matrices are every LoRA layer's out x in in bf16 (no
    per-layer dequantisation buffer then); auto gives its reason where it keeps none; where kept matrices make
    a run not fit, dropping them is the first remedy."""
    from peftctl import fast_path
    from peftctl.plan import plan_memory

    monkeypatch.setattr(fast_path, "triton_available", lambda: False)  # no dropout kernel to make a run fit
    monkeypatch.setattr(fast_path, "liger_available", lambda: True)

    def plan(keep, gib):
        recipe = make_recipe(str(LLAMA3_8B), {"name": "qlora", "r": 16, "dropout": 0.05, "targets": "all-linear"},
                             quantization={"bits": 4, "keep_dequantized": keep}, micro_batch_size=4,
                             max_length=2048)
        return plan_memory(recipe, card=card(gib))

    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v; gate, up, down
    kept = plan(True, 139)
    parts = {c.name: c.bytes for c in kept.components}
    assert parts["kept dequantised weights"] == 2 * 32 * per_layer and "dequantised weight" not in parts
    plain = plan(False, 139)
    assert kept.peak - plain.peak == 2 * 32 * per_layer - dict((c.name, c.bytes) for c in plain.components)[
        "dequantised weight"]
    assert "matrices kept" in kept.setting.describe() and "matrices kept" not in plain.setting.describe()
    assert any("not kept: with them (13.0 GiB more)" in n for n in plan("auto", 80).notes)
    # asked for explicitly, the matrices count when gradient_checkpointing: auto decides: on a 72 GiB card the run
    # fits only with checkpointing on (with the matrices off it would fit without)
    forced = plan(True, 72)
    assert forced.fits is True and forced.setting.checkpointing and forced.setting.keep_dequantized
    assert plan(False, 72).setting.checkpointing is False
    # where even that does not fit, dropping them is the first remedy
    tight = plan(True, 20)
    assert tight.fits is False and tight.setting.checkpointing
    assert tight.remedies[0][0] == "quantization.keep_dequantized: false"
    assert tight.remedies[0][1].fits is True and len(tight.remedies) == 1


@pytest.mark.parametrize("change, why", [
    ({"method": {"use_dora": True}}, "no LoRA layer here computes its 4-bit base"),  # DoRA: peft's own forward
    ({"dtype": "float16"}, "no LoRA layer here computes its 4-bit base"),  # fp16 weights, bf16 compute
])
def test_kept_4bit_matrices_say_why_none_is_kept(monkeypatch, change, why):
    from peftctl import fast_path
    from peftctl.plan import plan_memory

    monkeypatch.setattr(fast_path, "liger_available", lambda: True)
    method = {"name": "qlora", "r": 16, "dropout": 0.0, "targets": "all-linear", **change.get("method", {})}
    for keep in ("auto", True):
        recipe = make_recipe(str(LLAMA3_8B), method, quantization={"bits": 4, "keep_dequantized": keep},
                             dtype=change.get("dtype", "bfloat16"), micro_batch_size=4, max_length=2048)
        plan = plan_memory(recipe, card=card(139))
        assert not plan.setting.keep_dequantized and any(why in n for n in plan.notes), plan.notes
