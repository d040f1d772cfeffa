"""Merge benchmark (BENCHMARKS.md, "Merge"): plain peft on the GPU against `peftctl merge`, LoRA and QLoRA,
side by side.

    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1; python scripts/bench_merge.py --out $OUT
    python scripts/bench_merge.py --shrink 64 --device cpu --out /tmp/bench-merge    # CPU smoke run (the tests)

One invocation writes the Llama-3-8B shape (random bf16 weights, std 0.02) into one ~16 GB model.safetensors file,
tensor by tensor, and two rank-16 adapters on all linear layers (random A and B, alpha 32): a LoRA one and a QLoRA
one (recorded as trained on the NF4 double-quant base, so `peftctl merge` folds it onto the NF4-dequantised
weights). Then each side runs in its own process, so each peak is that side's alone:
  plain peft   AutoModelForCausalLM.from_pretrained (bf16, on the device), PeftModel.from_pretrained,
               merge_and_unload, save_pretrained -- not verified
  peftctl      `peftctl merge` of the LoRA adapter, then of the QLoRA adapter, both verified, --dtype bfloat16
Time excludes the imports; peak host memory is the process's VmHWM; peak GPU memory is torch's peak allocation.
Each output is deleted after it is measured (the disk holds the base and one output). The report is OUT/
bench_merge.json and OUT/bench_merge.md; the exit code is 1 when a side fails, else 0; missed targets are flagged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
QLORA = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
# Targets on one H200 (BENCHMARKS.md): LoRA at most plain peft's time, QLoRA at most 1.3x it, host peak at most 3 GB.
QLORA_RATIO, HOST_PEAK = 1.3, 3e9

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def model_config(shrink: int) -> dict:
    """The 8B shape, or (shrink > 1) its widths divided by `shrink` on 2 layers, for a smoke run."""
    if shrink <= 1:
        return dict(LLAMA3_8B)
    return {**LLAMA3_8B, "vocab_size": LLAMA3_8B["vocab_size"] // shrink,
            "hidden_size": LLAMA3_8B["hidden_size"] // shrink,
            "intermediate_size": LLAMA3_8B["intermediate_size"] // shrink, "num_hidden_layers": 2}


# --- the inputs: one large safetensors file and two adapters ---------------------------------------------------


def write_base(folder: Path, config: dict, device: str) -> int:
    """config.json and one model.safetensors, written tensor by tensor (random bf16, generated on `device`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftctl.merge.models import empty_model
    from peftctl.merge.safetensors_io import ShardWriter

    folder.mkdir(parents=True)
    hf_config = AutoConfig.for_model("llama", **config, dtype="bfloat16")
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(str(folder))
    del AutoModelForCausalLM
    shapes = {name: tuple(p.shape) for name, p in empty_model(hf_config).named_parameters()}
    entries = [(name, "BF16", shape, math.prod(shape) * 2) for name, shape in shapes.items()]
    writer = ShardWriter(folder / "model.safetensors", entries)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        writer.write(name, tensor)
    writer.close()
    return (folder / "model.safetensors").stat().st_size


def write_adapter(folder: Path, base: Path, config: dict, quantization: dict | None) -> None:
    """A LoRA adapter as peft saves it (r 16 on all linear layers, random A and B) plus peftctl's adapter info."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (out, inp) in shapes.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            # B large enough that bf16 rounding of the merged weights keeps the adapter's effect
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, inp, generator=generator) / math.sqrt(inp)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(folder))
    (folder / "peftctl_adapter.json").write_text(json.dumps({
        "method": "qlora" if quantization else "lora", "base_model": str(base), "revision": None,
        "dtype": "bfloat16", "quantization": quantization, "can_merge": True}))


# --- the sides, each in its own process ---------------------------------------------------------------------------


def host_peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> int:
    """One side, measured in this process; prints one JSON line."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftctl.merge import merge_adapter

    cuda = args.device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context, as the imports, is outside the timing
    out = Path(args.out_model)
    start = time.perf_counter()
    result: dict = {}
    if args.worker == "plain":
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16,
                                                     device_map="cuda" if cuda else None)
        model = PeftModel.from_pretrained(model, args.adapter)
        merged = model.merge_and_unload()
        if cuda:
            torch.cuda.synchronize()
        result["load_merge_s"] = time.perf_counter() - start
        merged.save_pretrained(str(out))
    else:
        report = merge_adapter(args.adapter, out, dtype="bfloat16", device=args.device)
        check = report.verification or {}
        result["verification"] = {k: check.get(k) for k in ("relative_diff", "tolerance", "float32_relative_diff",
                                                             "base_relative_diff", "adapter_relative_effect")}
        result["device_used"] = report.device
    result["seconds"] = time.perf_counter() - start
    result["host_peak_bytes"] = host_peak()
    result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_side(name: str, args: argparse.Namespace, base: Path, adapter: Path, work: Path) -> dict:
    out_model = work / f"out-{name}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "plain" if name == "plain peft" else "peftctl",
           "--device", args.device, "--base", str(base), "--adapter", str(adapter), "--out-model", str(out_model)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), str(REPO)] if p)
    log(f"{name}: running")
    began = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.side_timeout:.0f} s"}
    finally:
        shutil.rmtree(out_model, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"status": f"failed (exit {done.returncode})", "stderr_tail": done.stderr[-3000:]}
    result = {"status": "completed", "process_s": time.perf_counter() - began, **json.loads(lines[-1][7:])}
    log(f"{name}: {result['seconds']:.1f} s, host peak {result['host_peak_bytes'] / GIB:.2f} GiB" +
        (f", GPU peak {result['gpu_peak_bytes'] / GIB:.2f} GiB" if result.get("gpu_peak_bytes") else ""))
    return result


def verdicts(report: dict) -> list[str]:
    sides, flags = report["sides"], []
    plain = sides.get("plain peft", {}).get("seconds")
    for name, side in sides.items():
        if side.get("status") != "completed":
            flags.append(f"{name}: {side.get('status')}")
    if not report["full_shape"] or plain is None:
        return flags
    for name, limit in (("peftctl LoRA", 1.0), ("peftctl QLoRA", QLORA_RATIO)):
        seconds = sides.get(name, {}).get("seconds")
        if seconds is not None and seconds > limit * plain:
            flags.append(f"{name}: {seconds:.1f} s, over {limit:g} x plain peft ({plain:.1f} s)")
        peak = sides.get(name, {}).get("host_peak_bytes")
        if peak is not None and peak > HOST_PEAK:
            flags.append(f"{name}: host peak {peak / 1e9:.2f} GB, over {HOST_PEAK / 1e9:g} GB")
    return flags


def markdown(report: dict) -> str:
    rows = ["| what | time (s) | peak host GiB | peak GPU GiB | verified (merged vs base + adapter, tolerance) |",
            "| --- | ---: | ---: | ---: | --- |"]
    for name, side in report["sides"].items():
        if side.get("status") != "completed":
            rows.append(f"| {name} | {side.get('status')} | | | |")
            continue
        gpu = side.get("gpu_peak_bytes")
        check = side.get("verification")
        verified = f"{check['relative_diff']:.3g} ({check['tolerance']:.3g})" if check else "no"
        rows.append(f"| {name} | {side['seconds']:.1f} | {side['host_peak_bytes'] / GIB:.2f} | "
                    f"{gpu / GIB:.2f} | {verified} |" if gpu is not None else
                    f"| {name} | {side['seconds']:.1f} | {side['host_peak_bytes'] / GIB:.2f} | - | {verified} |")
    head = (f"{report['shape']}, base file {report['base_bytes'] / 1e6:,.0f} MB, device {report['device']}, "
            f"rank {RANK} on all linear layers\n\n")
    flags = "".join(f"\n- {flag}" for flag in report["flags"]) or "\n- all targets met"
    return head + "\n".join(rows) + "\n" + flags + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    parser.add_argument("--shrink", type=int, default=1, help="divide the widths by this (and use 2 layers)")
    parser.add_argument("--out", default=None, help="report folder (default $OUT, else TMPDIR/peftctl-bench-merge)")
    parser.add_argument("--work", default=None, help="folder for the base, adapters and outputs (default: temporary)")
    parser.add_argument("--sides", default="plain peft,peftctl LoRA,peftctl QLoRA")
    parser.add_argument("--side-timeout", type=float, default=240)
    parser.add_argument("--worker", choices=["plain", "peftctl"], help=argparse.SUPPRESS)
    for name in ("--base", "--adapter", "--out-model"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return worker(args)
    out = Path(args.out or os.environ.get("OUT") or Path(tempfile.gettempdir()) / "peftctl-bench-merge")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="peftctl-bench-merge-"))
    try:
        config = model_config(args.shrink)
        base = work / "base"
        log(f"writing the base ({'Llama-3-8B shape' if args.shrink <= 1 else f'shrunk {args.shrink}x'})")
        base_bytes = write_base(base, config, args.device)
        write_adapter(work / "lora", base, config, None)
        write_adapter(work / "qlora", base, config, QLORA)
        log(f"base {base_bytes / 1e9:.2f} GB in one file; adapters written")
        report = {"shape": "Llama-3-8B shape" if args.shrink <= 1 else f"Llama-3-8B shape / {args.shrink}, 2 layers",
                  "full_shape": args.shrink <= 1, "device": args.device, "base_bytes": base_bytes, "sides": {}}
        adapters = {"plain peft": work / "lora", "peftctl LoRA": work / "lora", "peftctl QLoRA": work / "qlora"}
        for name in [s.strip() for s in args.sides.split(",") if s.strip()]:
            report["sides"][name] = run_side(name, args, base, adapters[name], work)
            report["flags"] = verdicts(report)
            (out / "bench_merge.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "bench_merge.md").write_text(markdown(report))
        print(markdown(report))
        return 1 if any(s.get("status") != "completed" for s in report["sides"].values()) else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
