"""On a CUDA GPU (opt-in: `python -m pytest -m gpu`): the fast path computes what the plain path computes, packing
stays isolated in bf16 with SDPA, and LoRA and QLoRA train through `peftctl train`."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from conftest import read_jsonl, run_cli  # noqa: E402

MEDIUM = dict(hidden=1024, layers=4, heads=8, kv_heads=2, intermediate=2816, max_positions=2048)


@pytest.fixture(scope="module")
def medium_llama(tiny_model):
    return tiny_model("llama", init_std=0.02, **MEDIUM)


def _batches(recipe, tok, packed):
    from peftctl.data.prepare import prepare

    return prepare(recipe.dataset, tok, seed=0, pad_id=tok.pad_token_id, packed=packed)


def test_fused_loss_equals_logits_loss_and_packing_holds(medium_llama, write_recipe):
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.methods.registry import METHODS
    from peftctl.model import load_model, load_tokenizer
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.kernels import apply_fast_kernels, liger_available
    from peftctl.train.loss import build_loss, loss_sum

    loaded = load_recipe(str(write_recipe(medium_llama, model={"dtype": "bfloat16"}, dataset={"max_length": 512})))
    recipe = loaded.recipe
    device = torch.device("cuda")
    tok = load_tokenizer(recipe.model)
    model = load_model(recipe, device)
    kernels = apply_fast_kernels(model, device)
    model = runtime.attach(model, recipe.method, AttachContext(tokenizer_path=recipe.model.name)).eval()
    loss_fn, name = build_loss(model, METHODS["lora"], device)
    if liger_available():
        assert kernels and name == "liger_fused_linear_cross_entropy"
    packed, unpacked = _batches(recipe, tok, True), _batches(recipe, tok, False)
    batch = packed.micro_batches(packed.train, [0, 1], 2)[0].to(device)
    examples = sorted(i for r in packed.train.rows[:2] for i in r)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = loss_fn(model, batch) / batch.n_trained
        plain = loss_sum(model, batch) / batch.n_trained
        singles = unpacked.micro_batches(unpacked.train, examples, 4)
        unpacked_loss = sum(loss_sum(model, b.to(device)) for b in singles) / sum(b.n_trained for b in singles)
    assert math.isfinite(fused.item())
    assert fused.item() == pytest.approx(plain.item(), rel=1e-2)
    assert plain.item() == pytest.approx(unpacked_loss.item(), rel=2e-2)
    if liger_available():  # the logits a chunk of 1 or 8 hidden-state-sizes at a time: the same loss
        from peftctl.train.loss import fused_loss_module, fused_loss_sum

        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            chunked = {c: fused_loss_sum(model, batch, loss_module=fused_loss_module(c)).item() for c in (1, 8)}
        assert fused_loss_module(8).chunk_mem == 8
        assert chunked[8] == pytest.approx(chunked[1], rel=1e-3)
        assert chunked[8] == pytest.approx(fused.item() * batch.n_trained, rel=1e-3)  # build_loss's: chunks of 8


@pytest.mark.parametrize("method, quant", [("lora", None), ("qlora", {"bits": 4})])
def test_train_on_gpu(medium_llama, write_recipe, tmp_path, method, quant):
    sections = dict(model={"dtype": "bfloat16"},
                    method={"name": method, "r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear",
                            "_replace": True},
                    dataset={"max_length": 512}, training={"max_steps": 6, "micro_batch_size": 4})
    if quant:
        sections["quantization"] = quant
    path = write_recipe(medium_llama, **sections)
    result = run_cli("train", str(path), "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["peak_memory_bytes"] > 0
    assert manifest["device"].startswith("NVIDIA")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    values = [r["loss"] for r in records]
    assert len(values) == 6 and all(math.isfinite(v) for v in values)
    # steps 3-5 are launched ahead and timed by CUDA events: each a real time, and together no more than the
    # wall time between the first and the last step's lines
    seconds = [r["tokens"] / r["tokens_per_s"] for r in records]
    assert all(s > 1e-4 for s in seconds)
    assert sum(seconds[1:]) <= records[-1]["elapsed_s"] - records[0]["elapsed_s"] + 0.02  # elapsed_s: 2 decimals
    print(f"{method}: losses {values}, fast path {manifest['fast_path']}, "
          f"peak {manifest['peak_memory_bytes'] / 2**30:.2f} GiB, {manifest['tokens_per_s']} tok/s")


def test_reentrant_checkpointing_trains_what_the_non_reentrant_form_trains(medium_llama, write_recipe, tmp_path,
                                                                          monkeypatch):
    """QLoRA with checkpointing on CUDA (the fused branch, the NF4 kernel, dropout on): the reentrant form, which one
    process takes, and the non-reentrant one give the same losses and adapter."""
    from safetensors.torch import load_file

    from peftctl import activation_checkpointing
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    def run(name):
        path = write_recipe(medium_llama, name=f"{name}.yaml", out=tmp_path / name, model={"dtype": "bfloat16"},
                            quantization={"bits": 4},
                            method={"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.1, "targets": "all-linear",
                                    "_replace": True},
                            dataset={"max_length": 1024},
                            training={"max_steps": 4, "micro_batch_size": 2, "gradient_checkpointing": True})
        train(load_recipe(str(path)), TrainOptions(quiet=True))
        manifest = json.loads((tmp_path / name / "run.json").read_text())
        losses = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
        return manifest, losses, load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    reentrant = run("reentrant")
    monkeypatch.setattr(activation_checkpointing, "reentrant_allowed", lambda *a: False)
    other = run("non_reentrant")
    assert reentrant[0]["fast_path"]["activation_checkpointing"] == "reentrant"
    calls = [r[0]["fast_path"]["activation_checkpointing_calls"] for r in (reentrant, other)]
    assert calls[0]["reentrant"] > 0 and calls[0]["non_reentrant"] == 0
    assert calls[1]["reentrant"] == 0 and calls[1]["non_reentrant"] == calls[0]["reentrant"]
    assert "fused_lora_branch" in reentrant[0]["fast_path"]["kernels"]
    assert reentrant[1] == pytest.approx(other[1], rel=2e-3) and len(reentrant[1]) == 4
    assert reentrant[2].keys() == other[2].keys()
    # every layer learned: B starts at zero and stays there where a layer gets no gradient
    assert all(t.abs().max() > 0 for k, t in reentrant[2].items() if "lora_B" in k)
    # Adam moves a weight by about the learning rate (1e-3) a step; the runs differ only where bf16 kernels sum in
    # another order (a gradient near zero can flip an update's sign), so nearly every weight agrees within a tenth
    differing = sum(((reentrant[2][k].float() - other[2][k].float()).abs() > 1e-4).sum().item() for k in other[2])
    assert differing <= 0.01 * sum(t.numel() for t in other[2].values())
    print(f"losses {reentrant[1]} / {other[1]}; peaks {reentrant[0]['peak_memory_bytes'] / 2**30:.3f} / "
          f"{other[0]['peak_memory_bytes'] / 2**30:.3f} GiB")


def test_kept_4bit_matrices_train_what_dequantising_every_step_trains(medium_llama, write_recipe, tmp_path):
    """quantization.keep_dequantized on CUDA (the NF4 kernel's matrices, batches long enough for the forward to
    read them too): the same losses and adapter as dequantising twice a step, and the peak higher by the
    matrices."""
    from safetensors.torch import load_file

    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    def run(keep):
        name = f"keep-{keep}"
        path = write_recipe(medium_llama, name=f"{name}.yaml", out=tmp_path / name, model={"dtype": "bfloat16"},
                            quantization={"bits": 4, "keep_dequantized": keep},
                            method={"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.1, "targets": "all-linear",
                                    "_replace": True},
                            dataset={"max_length": 512}, training={"max_steps": 4, "micro_batch_size": 4})
        train(load_recipe(str(path)), TrainOptions(quiet=True))
        manifest = json.loads((tmp_path / name / "run.json").read_text())
        losses = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
        return manifest, losses, load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    kept, plain = run(True), run(False)
    assert "dequantized_4bit_weights_kept" in kept[0]["fast_path"]["kernels"]
    assert "dequantized_4bit_weights_kept" not in plain[0]["fast_path"]["kernels"]
    assert kept[1] == pytest.approx(plain[1], rel=2e-3) and len(kept[1]) == 4
    differing = sum(((kept[2][k].float() - plain[2][k].float()).abs() > 1e-4).sum().item() for k in plain[2])
    assert differing <= 0.01 * sum(t.numel() for t in plain[2].values())
    h, i = MEDIUM["hidden"], MEDIUM["intermediate"]
    kv = h // MEDIUM["heads"] * MEDIUM["kv_heads"]
    matrices = 2 * MEDIUM["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)  # bf16 q, o, k, v, gate, up, down
    # The loop's own peak (the whole run's is the load's here: a bf16 model quantised on the way in). On this small
    # model the two peaks fall at different moments (measured: +0.63 x the matrices); on the 8B, where activations
    # set the peak, the growth is the matrices' 13.0 GiB to 0.1% (BENCHMARKS.md, run AC)
    peaks = [run[0]["memory_per_rank"][0]["loop_peak_memory_bytes"] for run in (kept, plain)]
    assert 0.5 * matrices < peaks[0] - peaks[1] < 1.2 * matrices
    print(f"losses {kept[1]} / {plain[1]}; loop peaks {peaks[0] / 2**30:.3f} / {peaks[1] / 2**30:.3f} GiB; "
          f"matrices {matrices / 2**30:.3f} GiB")


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_fused_lora_branch_matches_peft_under_autocast(medium_llama, quant):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftctl.train.fused_lora import fuse_lora_layers

    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)

    def build():  # twice, the same seed: the same random adapter (no deepcopy of 4-bit weights)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(medium_llama, **kwargs)
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                               init_lora_weights=False))

    model, fused = build(), build()
    assert fuse_lora_layers(fused) == 7 * MEDIUM["layers"]
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    results = []
    for m in (model, fused):
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in m.named_parameters() if p.requires_grad])
        results.append((out.loss.item(), grads))
    (loss, grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(loss, rel=1e-3)
    cosine = torch.nn.functional.cosine_similarity(grads, fused_grads, dim=0).item()
    assert cosine > 0.999 and (fused_grads.norm() / grads.norm()).item() == pytest.approx(1, rel=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_varlen_kernel_matches_sdpa_with_a_block_mask_on_llama3_8b_heads(dtype):
    """torch's varlen_attn through our wrapper: outputs and q/k/v gradients against SDPA with an explicit
    block-diagonal causal mask, 32 query heads, 8 key/value heads, head_dim 128, 2 rows of 2048 (the probe)."""
    from peftctl import fast_path, packed_attention

    if fast_path.torch_version() < fast_path.VARLEN_MIN_TORCH:
        pytest.skip("torch has no varlen_attn")
    shape = {"heads": 32, "kv_heads": 8, "head_dim": 128, "rows": 2, "length": 2048}
    assert packed_attention.probe("varlen", shape, torch.device("cuda"), getattr(torch, dtype)) is None
    # and the probe is not blind: a wrong scale is caught
    real = packed_attention.varlen_kernel()

    def wrong_scale(*args, scale=None, **kwargs):
        return real(*args, scale=scale * 1.5, **kwargs)

    wrong_scale.__signature__ = __import__("inspect").signature(real)
    original = packed_attention.varlen_kernel
    packed_attention.varlen_kernel = lambda: wrong_scale
    try:
        assert "differs" in packed_attention.probe("varlen", shape, torch.device("cuda"), getattr(torch, dtype))
    finally:
        packed_attention.varlen_kernel = original


def test_a_packed_run_chooses_varlen_and_packed_equals_unpacked(medium_llama, write_recipe, tmp_path):
    from peftctl import fast_path, packed_attention
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model, load_tokenizer
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train
    from peftctl.train.loss import loss_sum

    if fast_path.torch_version() < fast_path.VARLEN_MIN_TORCH:
        pytest.skip("torch has no varlen_attn")
    path = write_recipe(medium_llama, model={"dtype": "bfloat16"}, dataset={"max_length": 512, "packing": True},
                        training={"max_steps": 4, "micro_batch_size": 4})
    recipe = load_recipe(str(path)).recipe
    device = torch.device("cuda")
    tok = load_tokenizer(recipe.model)
    model = load_model(recipe, device)
    notes = []
    record = packed_attention.choose_for_run(model, recipe, device, packed=True, say=notes.append)
    assert record == {"kernel": "varlen", "tried": []}, notes
    model = runtime.attach(model, recipe.method, AttachContext(tokenizer_path=recipe.model.name)).eval()
    assert packed_attention.uses_documents(model)
    packed, unpacked = _batches(recipe, tok, True), _batches(recipe, tok, False)
    batch = packed.micro_batches(packed.train, [0, 1], 2)[0]
    assert batch.cu_seq_lens is not None and len(batch.cu_seq_lens) > 3  # several documents a row
    examples = sorted(i for r in packed.train.rows[:2] for i in r)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed_loss = loss_sum(model, batch.to(device)) / batch.n_trained
        singles = unpacked.micro_batches(unpacked.train, examples, 4)
        unpacked_loss = sum(loss_sum(model, b.to(device)) for b in singles) / sum(b.n_trained for b in singles)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-2)
    del model
    result = train(load_recipe(str(path)), TrainOptions(quiet=True))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert result.steps == 4 and manifest["fast_path"]["attention"] == {"kernel": "varlen", "tried": []}


@pytest.mark.parametrize("width_in, width_out", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_lora_dropout_kernel_against_peft_on_8b_widths(width_in, width_out, monkeypatch):
    """LoRA's dropout kernel on the Llama-3-8B widths in bf16 (r 16, p 0.05), under autocast as the loop trains:
    p = 0 gives peft's product; with p > 0 the mask read back from x's gradient drops about p, and the output and
    every gradient follow the explicit formula for that mask."""
    pytest.importorskip("triton")
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora_layer

    from peftctl.train import fused_lora, lora_dropout_kernel
    from peftctl.train.fused_lora import lora_branch

    calls = []
    forward = fused_lora._KernelDropout.forward
    monkeypatch.setattr(fused_lora._KernelDropout, "forward", lambda *a: (calls.append(1), forward(*a))[1])
    torch.manual_seed(0)
    tokens, r, p = 4096, 16, 0.05
    base = torch.nn.Linear(width_in, width_out, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=32, lora_dropout=p, init_lora_weights=False)
    layer = lora_layer.Linear(base, "default", config=config, r=r, lora_alpha=32).cuda()
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(tokens, width_in, device="cuda", dtype=torch.bfloat16)

    # p = 0: the kernel's product is peft's (dropout off), at bf16 tolerance
    seed = lora_dropout_kernel.draw_seed(x.device)
    h = lora_dropout_kernel.dropout_a_forward(x, a.to(torch.bfloat16), seed, 0.0)
    layer.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(h, layer.lora_A["default"](x), rtol=2e-2, atol=2e-2)
        want = layer(x)
    with torch.no_grad():
        got = lora_branch(x, base(x), a, b, 0.0, scaling)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    # p > 0: the kernel (the base output given, so x's gradient is the branch's alone: zero where dropped)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    result = base(x)
    out = lora_branch(leaves[0], result, leaves[1], leaves[2], p, scaling)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert calls == [1]
    kept = leaves[0].grad != 0
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - p) < 6 * (p * (1 - p) / n) ** 0.5
    eager_in = [t.detach().float().requires_grad_() for t in (x, a, b)]
    ex, ea, eb = eager_in
    eager = result.float() + ((ex * kept / (1 - p)) @ ea.t()) @ eb.t() * scaling
    eager.backward(grad.float())
    rel = lambda f, e: ((f.float() - e).norm() / e.norm()).item()  # noqa: E731
    assert rel(out.detach(), eager.detach()) < 1e-2
    for name, f, e in zip(("x", "A", "B"), leaves, eager_in):
        assert rel(f.grad, e.grad) < 2e-2, name


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nf4_kernel_gives_bitsandbytes_cuda_values_bit_for_bit(nested, dtype):
    """peftctl's one-launch NF4 dequantisation against bitsandbytes' own CUDA kernels, at an 8B MLP weight's size
    (14,336 x 4,096), a k/v projection's (1,024 x 4,096), and sizes that end inside a program (33 x 64) and inside a
    quantisation block (7 x 100)."""
    import bitsandbytes.functional as bnb_functional

    from peftctl.train import nf4_kernel

    for shape in ((14336, 4096), (1024, 4096), (33, 64), (7, 100)):
        torch.manual_seed(0)
        weight = torch.randn(*shape, device="cuda", dtype=getattr(torch, dtype)) * 0.02  # bitsandbytes' out dtype
        packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
        param = torch.nn.Parameter(packed, requires_grad=False)
        param.quant_state = state
        assert nf4_kernel.applies(param, getattr(torch, dtype))
        ours = nf4_kernel.dequantize_nf4(param, getattr(torch, dtype))
        theirs = bnb_functional.dequantize_4bit(packed, state)
        assert torch.equal(ours, theirs), f"{shape}: {(ours.float() - theirs.float()).abs().max().item()}"


def test_step_clock_times_the_device_work_between_its_marks():
    """The step clock's events measure the GPU's time between two marks, though the host returns at once."""
    import time

    from peftctl.train.timings import StepClock

    clock, a = StepClock(torch.device("cuda")), torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    begin = clock.mark()
    for _ in range(200):
        a = (a @ a).tanh_()
    end = clock.mark()
    host = time.perf_counter() - t0  # the launches alone
    seconds = clock.seconds(begin, end)
    torch.cuda.synchronize()
    waited = time.perf_counter() - t0
    assert host < seconds <= waited
