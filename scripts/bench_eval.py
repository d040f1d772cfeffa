"""`peftctl eval`'s code path against a plain transformers `generate` loop, on a QLoRA adapter of the Llama-3-8B
shape (random weights, word-level tokenizer: scripts/bench.py's model), one GPU, in one run.

The model is built once with random bf16 weights and saved to a temporary folder; a LoRA adapter (r 16, all linear
layers, random non-zero weights) is attached to the base loaded in 4-bit NF4 and saved as a peftctl adapter folder
(so eval loads the base in 4-bit, as a QLoRA run would have trained it). Then, on the same prompt_completion data:

  peftctl   peftctl.eval.evaluate([ADAPTER]) over --examples examples: loss pass, batched greedy generation with
            left padding and the KV cache (--batch-size prompts per call), exact match / token F1
  plain     the loop a user writes: PeftModel on the 4-bit base, one `model.generate` per prompt, greedy, over the
            first --plain-examples examples (a one-at-a-time loop over all 500 would not fit the time)

Random weights never emit EOS, so every example generates exactly --max-new-tokens tokens on both sides. Prints
examples/s for each and their ratio, and how many of the plain loop's predictions peftctl's batched path reproduces
token for token (bf16 batching can flip a near-tie; that count is reported, not asserted).

    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1; python scripts/bench_eval.py --out $OUT
    python scripts/bench_eval.py --shrink --device cpu --examples 12 --plain-examples 4   # CPU smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_model(folder: Path, shape) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from bench import model_config, write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, shape.config["vocab_size"], max(8192, shape.config["max_position_embeddings"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=getattr(torch, shape.dtype))
    model.save_pretrained(str(folder))
    del model


def build_adapter(model_dir: Path, adapter_dir: Path, quant: dict | None) -> None:
    """A LoRA adapter with random (non-zero) weights on the base loaded as eval will load it, saved as `train`
    saves one: peft's files, the tokenizer, and peftctl_adapter.json naming the base and its quantisation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from peftctl.eval.targets import BaseSpec
    from peftctl.model import load_model, pick_device

    spec = BaseSpec(name=str(model_dir), dtype="bfloat16", quantization=json.dumps(quant) if quant else None)
    base = load_model(spec.recipe(), pick_device())
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))
    model.save_pretrained(str(adapter_dir))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(adapter_dir))
    info = {"method": "qlora" if quant else "lora", "base_model": str(model_dir), "revision": None,
            "trust_remote_code": False, "dtype": "bfloat16", "quantization": quant, "can_merge": True}
    (adapter_dir / "peftctl_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    del model, base


def write_data(path: Path, n: int, vocab_size: int, prompt_range: tuple[int, int], seed: int = 0) -> None:
    from bench import N_SPECIAL

    rng = random.Random(seed)
    words = vocab_size - N_SPECIAL
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(*prompt_range)))
            completion = " " + " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def plain_loop(model_dir: Path, adapter_dir: Path, prompts: list[str], quant: dict | None, max_new_tokens: int):
    """What the transformers and peft docs show: load, wrap, generate one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": device}}
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if quant and device == "cpu":
        from peftctl.model import disable_cpu_repacking

        disable_cpu_repacking(model)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    eos = tokenizer.eos_token_id
    outputs = []
    with torch.no_grad():  # one untimed call, as peftctl's side is warm from its loss pass
        ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"].to(device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       eos_token_id=eos, pad_token_id=eos)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, ids.shape[1]:].tolist()
        outputs.append(new[:new.index(eos)] if eos in new else new)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    decoded = [tokenizer.decode(x, skip_special_tokens=True) for x in outputs]
    del model
    return decoded, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--plain-examples", type=int, default=64, help="examples the one-at-a-time loop runs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call on peftctl's side")
    parser.add_argument("--quant", choices=["4bit", "none"], default="4bit")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shrink", action="store_true", help="the tiny llama shape instead of Llama-3-8B (smoke)")
    parser.add_argument("--out", help="folder for bench_eval.json (default: print only)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: peftctl then picks the CPU too
    import torch

    from bench import LLAMA3_8B, TINY

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --shrink for a smoke run")
    shape = TINY if args.shrink else LLAMA3_8B
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
             "upcast_embeddings": False} if args.quant == "4bit" else None
    prompt_range = (8, 48) if args.shrink else (64, 256)
    report = {"shape": shape.name, "quantization": args.quant, "examples": args.examples,
              "plain_examples": args.plain_examples, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        build_model(work / "model", shape)
        log(f"built and saved the model ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        build_adapter(work / "model", work / "adapter", quant)
        log(f"built and saved the adapter ({time.perf_counter() - t0:.0f} s)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        data = work / "data.jsonl"
        write_data(data, args.examples, shape.config["vocab_size"], prompt_range)

        from peftctl.eval.evaluate import EvalOptions, evaluate

        t0 = time.perf_counter()
        result = evaluate([str(work / "adapter")], EvalOptions(
            data=str(data), format="prompt_completion", metrics=["loss", "exact_match", "token_f1"],
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=2048, bootstrap=0),
            report=log)
        total_s = time.perf_counter() - t0
        target = result.summary["targets"][0]
        predictions = result.predictions[target["label"]]
        generate_s = target["timings"]["generate_s"]
        report["peftctl"] = {"examples_per_s": round(args.examples / generate_s, 3), "generate_s": generate_s,
                             "loss_s": target["timings"].get("loss_s"), "load_s": target["timings"].get("load_s"),
                             "eval_total_s": round(total_s, 2), "generated_tokens": target["generated_tokens"],
                             "loss": target["metrics"]["loss"]}
        log(f"peftctl: {report['peftctl']}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        prompts = [e.prompt for e in result.examples[:args.plain_examples]]
        plain, seconds = plain_loop(work / "model", work / "adapter", prompts, quant, args.max_new_tokens)
        same = sum(a == b for a, b in zip(plain, predictions))
        report["plain"] = {"examples_per_s": round(len(prompts) / seconds, 3), "generate_s": round(seconds, 3),
                           "examples": len(prompts)}
        report["speedup"] = round(report["peftctl"]["examples_per_s"] / report["plain"]["examples_per_s"], 2)
        report["same_predictions"] = f"{same}/{len(prompts)}"
    log(f"plain loop: {report['plain']}")
    print(f"\nexamples/s  peftctl eval {report['peftctl']['examples_per_s']:.2f}  plain generate loop "
          f"{report['plain']['examples_per_s']:.2f}  speed-up {report['speedup']:.2f}x  (same predictions "
          f"{report['same_predictions']}; {args.examples} examples, {args.max_new_tokens} new tokens, "
          f"{shape.name}, {args.quant})")
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
