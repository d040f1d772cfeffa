"""Correctness gates of scripts/bench.py: a speed comparison means nothing unless both sides train the same thing.

Run once per bench invocation, in its own process, on the model and settings of the invocation's first case:

    python scripts/bench_gates.py SPEC.json          # SPEC: written by bench.py; RESULT json path inside

Gates (each PASS or FAIL; bench.py prints them and exits non-zero when one fails):

- same tokens: peftctl's data preparation and the reference's tokenisation give identical token ids for every
  example, and a text of N words is N tokens plus EOS.
- step-0 loss: the reference, `model(input_ids, attention_mask, labels=labels).loss` on its padded batch, and
  peftctl, `peftctl.train.loss.loss_sum(model, batch) / batch.n_trained` on a `peftctl.data.packing.collate`d
  packed batch of the same examples, agree within the tolerance (bf16: rtol 5e-3; float32: rtol 1e-4). Both
  models are loaded the way each side loads them (peftctl through its own model loader and attach); LoRA's B is
  zero at step 0, so both compute the base model's loss. HF's loss is a mean over its shifted labels; peftctl
  labels mask each example's first token, so n_trained counts the same positions.
- gradient: after one backward of that loss, the adapter's gradient norm is finite and non-zero (both sides).
- packed = unpacked: peftctl's loss on the packed batch equals its loss on the same examples one per padded row
  (the packed batch through the attention kernel the loop would choose -- varlen on a GPU -- with its document
  lengths; the padded rows through causal attention).
  Alongside, the loss with packing isolation turned off (positions running on across examples) shows how
  sensitive the check is: when that difference is not well above the tolerance, the gate says WEAK.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reference import PadToLongest, build_model, load_texts, tokenize


def _say(message: str) -> None:
    print(f"[gates] {message}", flush=True)


def _grad_norm(model) -> tuple[float, int, int]:
    """(norm over the trainable parameters' gradients, parameters with a gradient, trainable parameters)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in trainable if p.grad is not None]
    if not grads:
        return 0.0, 0, len(trainable)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        total += g.detach().float().pow(2).sum()
    return math.sqrt(total.item()), len(grads), len(trainable)


def _autocast(device, dtype):
    import contextlib

    import torch

    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peftctl_side(spec: dict, device) -> tuple[dict, list[dict]]:
    """peftctl's data preparation, batches, model and loss; returns measurements and its examples."""
    import torch

    from peftctl.data.packing import collate
    from peftctl.data.prepare import prepare
    from peftctl.model import load_tokenizer
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loss import loss_sum

    loaded = load_recipe(spec["recipe"])
    recipe = loaded.recipe
    tokenizer = load_tokenizer(recipe.model, base_dir=loaded.base_dir)
    data = prepare(recipe.dataset, tokenizer, seed=recipe.training.seed, pad_id=tokenizer.pad_token_id)
    columns = data.train.examples[:]
    examples = [{"input_ids": list(ids), "labels": list(labels)}
                for ids, labels in zip(columns["input_ids"], columns["labels"])]
    pad_id = data.pad_id
    packed = collate([[examples[i] for i in row] for row in data.train.rows], pad_id, packed=True)
    unpacked = collate([[e] for e in examples], pad_id, packed=False)
    # Isolation off: the same packed rows with positions running on across examples (plain causal attention).
    width = packed.input_ids.shape[1]
    running = torch.arange(width).unsqueeze(0).expand_as(packed.input_ids).contiguous()
    leaky = dataclasses.replace(packed, position_ids=running, cu_seq_lens=None)  # no document lengths either

    model, how = _peftctl_model(recipe, loaded, device)
    model.train()
    # The loss the product trains on: fused linear cross-entropy on the GPU when liger is there, else logits.
    from peftctl.methods.registry import METHODS
    from peftctl.train.loss import build_loss

    train_loss, loss_name = build_loss(model, METHODS[recipe.method.name], device)
    how += f" + {loss_name}"
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast_dtype = _autocast_dtype(recipe, device)
    with _autocast(device, autocast_dtype):
        loss = train_loss(model, packed.to(device)) / packed.n_trained
    loss.backward()
    norm, with_grad, n_trainable = _grad_norm(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(device, autocast_dtype):
        loss_unpacked = (loss_sum(model, unpacked.to(device)) / unpacked.n_trained).item()
        loss_leaky = (loss_sum(model, leaky.to(device)) / leaky.n_trained).item()
    out = {"loss_packed": loss.item(), "loss_unpacked": loss_unpacked, "loss_leaky": loss_leaky,
           "grad_norm": norm, "params_with_grad": with_grad, "trainable_tensors": n_trainable,
           "n_trained_packed": packed.n_trained, "n_trained_unpacked": unpacked.n_trained,
           "rows_packed": int(packed.input_ids.shape[0]), "model_loader": how,
           "adapter_dtype": str(trainable[0].dtype).replace("torch.", "")}
    del model, loss, trainable
    _release_memory()
    return out, examples


def _peftctl_model(recipe, loaded, device):
    """The model as `peftctl train` builds it: its loader (quantisation, preparation, any fast-path patches) and
    its attach step."""
    from peftctl import packed_attention
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model
    from peftctl.train.fused_lora import fuse_lora_layers
    from peftctl.train.kernels import apply_fast_kernels

    model = load_model(recipe, device, gradient_checkpointing=False)
    # the packed-attention kernel, chosen (and probed) as the training loop chooses it
    attention = packed_attention.choose_for_run(model, recipe, device, packed=True, say=_say)
    kernels = apply_fast_kernels(model, device)  # as the training loop does, before the adapter
    context = AttachContext(tokenizer_path=recipe.model.name, where=loaded.where("method.targets"))
    how = (f"peftctl.model.load_model + packed_attention({attention['kernel']}) + apply_fast_kernels"
           + (f"({','.join(kernels)})" if kernels else "()"))
    model = runtime.attach(model, recipe.method, context)
    fused = fuse_lora_layers(model)  # as the training loop does, after the adapter
    return model, how + f" + peftctl.methods.runtime.attach + fuse_lora_layers({fused} layers)"


def _autocast_dtype(recipe, device):
    """What the training loop autocasts to: the compute dtype (4-bit) or the weights' dtype, on CUDA only."""
    import torch

    from peftctl.fast_path import autocast_name

    name = autocast_name(recipe, device.type)
    return getattr(torch, name) if name else None


def _reference_side(spec: dict, device) -> tuple[dict, list[dict]]:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    features = tokenize(tokenizer, load_texts(spec["data"]))
    batch = PadToLongest(tokenizer.pad_token_id)(features)
    model = build_model(spec["model"], quantized=spec["quantized"], targets=spec["targets"], r=spec["r"],
                        alpha=spec["alpha"], dropout=spec["dropout"])
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if device.type == "cuda" else None  # TrainingArguments(bf16=True) autocasts to bf16
    with _autocast(device, dtype):
        loss = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     labels=batch["labels"].to(device)).loss
    loss.backward()
    norm, with_grad, n_trainable = _grad_norm(model)
    out = {"loss": loss.item(), "grad_norm": norm, "params_with_grad": with_grad, "trainable_tensors": n_trainable,
           "adapter_dtype": str(trainable[0].dtype).replace("torch.", "")}
    del model, loss, trainable
    _release_memory()
    return out, features


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def evaluate(spec: dict, pf: dict, ref: dict, pf_examples: list[dict], ref_features: list[dict],
             words: list[int]) -> list[dict]:
    rtol = spec["rtol"]
    gates = []

    same_ids = [e["input_ids"] for e in pf_examples] == [f["input_ids"] for f in ref_features]
    lengths_ok = [len(f["input_ids"]) for f in ref_features] == [n + 1 for n in words]
    gates.append({"name": "same tokens", "passed": bool(same_ids and lengths_ok),
                  "detail": f"{len(ref_features)} examples; identical ids: {same_ids}; N words -> N+1 tokens "
                            f"(EOS): {lengths_ok}"})

    diff = abs(pf["loss_packed"] - ref["loss"])
    gates.append({"name": "step-0 loss", "passed": _close(pf["loss_packed"], ref["loss"], rtol),
                  "detail": f"reference {ref['loss']:.6f} (padded batch), peftctl {pf['loss_packed']:.6f} (packed, "
                            f"{pf['rows_packed']} row(s)); |diff| {diff:.2e}, rtol {rtol:g}"})

    ok = all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 and s["params_with_grad"] > 0 for s in (pf, ref))
    gates.append({"name": "gradient", "passed": ok,
                  "detail": f"grad norm reference {ref['grad_norm']:.4g} ({ref['params_with_grad']}/"
                            f"{ref['trainable_tensors']} tensors), peftctl {pf['grad_norm']:.4g} "
                            f"({pf['params_with_grad']}/{pf['trainable_tensors']})"})

    diff = abs(pf["loss_packed"] - pf["loss_unpacked"])
    sensitivity = abs(pf["loss_leaky"] - pf["loss_packed"])
    tolerance = rtol * max(1.0, abs(pf["loss_packed"]))
    weak = sensitivity <= 2 * tolerance
    gates.append({"name": "packed = unpacked", "passed": _close(pf["loss_packed"], pf["loss_unpacked"], rtol),
                  "weak": weak,
                  "detail": f"packed {pf['loss_packed']:.6f}, unpacked {pf['loss_unpacked']:.6f}; |diff| {diff:.2e}; "
                            f"without isolation the loss moves by {sensitivity:.2e}"
                            + (" (WEAK: not well above the tolerance)" if weak else "")})
    return gates


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    t0 = time.time()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    result = {"status": "failed", "gates": [], "device": str(device)}
    try:
        # The reference first: a fast path that patches model classes (rather than one model) must not reach it.
        ref, ref_features = _reference_side(spec, device)
        _say(f"reference side: loss {ref['loss']:.6f}, grad norm {ref['grad_norm']:.4g} ({time.time() - t0:.0f} s)")
        pf, pf_examples = _peftctl_side(spec, device)
        _say(f"peftctl side: loss {pf['loss_packed']:.6f} packed, {pf['loss_unpacked']:.6f} unpacked, "
             f"grad norm {pf['grad_norm']:.4g} ({time.time() - t0:.0f} s)")
        words = [len(text.split()) for text in load_texts(spec["data"])]
        gates = evaluate(spec, pf, ref, pf_examples, ref_features, words)
        result = {"status": "completed", "gates": gates, "peftctl": pf, "reference": ref, "device": str(device),
                  "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                  "total_s": round(time.time() - t0, 1)}
        for gate in gates:
            _say(f"{'PASS' if gate['passed'] else 'FAIL'}{' (weak)' if gate.get('weak') else ''}  {gate['name']}: "
                 f"{gate['detail']}")
    finally:
        Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(g["passed"] for g in result["gates"]) else 1


if __name__ == "__main__":
    sys.exit(main())
