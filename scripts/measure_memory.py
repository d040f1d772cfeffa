"""Measure the peak GPU memory of real training steps and compare it with the memory plan (peftctl/plan/).

Every case is a recipe trained for a few steps through peftctl's own training path, each in a process of its own
so that its peak is clean; the plan for the same recipe is computed beside it (no GPU needed for that) and the
table shows plan vs measured with the error in percent. Eight cases calibrate the plan; two, marked held-out, are
not to be used to tune it and show how it does on recipes it was not fitted to.

On the GPU machine (one H200), from the repository root, about 6-8 minutes in all (one command):

    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1
    python scripts/measure_memory.py                 # every case; JSON to $OUT/memory_plan_vs_measured.json
    python scripts/measure_memory.py --only lora-4x2048,qlora-2x4096   # some of them
    python scripts/measure_memory.py --plain         # without liger-kernel: the loop's plain path

A case that would start after --budget seconds is skipped and listed: run those with --only in a second command
(the model folder is reused while the machine stays warm). Here, on a CPU, `--tiny` runs the same machinery on a tiny
model in a minute or so (no peak to measure there):

    python scripts/measure_memory.py --tiny

The model is the Llama-3-8B shape with random weights (speed and memory do not depend on the values), saved once
in bf16 to WORK/llama3-8b-random (WORK: /tmp/peftctl-memory; about 16 GB, reused while the folder exists) with a
small locally trained tokenizer: the embedding keeps its 128,256 rows, so logits have their real size. The data is
random sentences in `completion` rows of 200-1,200 tokens, packed into rows of max_length as users' data would be.

The measured peak is `torch.cuda.max_memory_allocated()` of the training process: the `peak_memory_bytes` the
loop writes to run.json, or (while the loop does not write it yet) what the child process reads itself after the
run. The child also records the memory before and after each forward pass, which the JSON keeps for calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

GiB = 1024 ** 3
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Case:
    name: str
    method: dict
    micro_batch_size: int
    max_length: int
    checkpointing: bool
    held_out: bool = False
    quantization: dict | None = None

    def recipe(self, model: Path, data: Path, out: Path, steps: int) -> dict:
        recipe = {
            "model": {"name": str(model), "dtype": "bfloat16"},
            "method": self.method,
            "dataset": {"path": str(data), "format": "completion", "validation": 0.0, "max_length": self.max_length},
            "training": {"max_steps": steps, "micro_batch_size": self.micro_batch_size, "gradient_accumulation": 1,
                         "learning_rate": 1e-4, "warmup_steps": 0, "gradient_checkpointing": self.checkpointing,
                         "eval_every": 1000, "save_every": 1000, "seed": 0},
            "output": {"dir": str(out)},
        }
        if self.quantization:
            recipe["quantization"] = self.quantization
        return recipe


def _lora(targets, r=16) -> dict:
    return {"name": "lora", "r": r, "alpha": 2 * r, "targets": targets}


def _qlora(r=16) -> dict:
    return {"name": "qlora", "r": r, "alpha": 2 * r, "targets": "all-linear"}


# The calibration cases cross bf16 LoRA (q,k,v,o) and QLoRA (all linear layers) with checkpointing on and off,
# 1,024 and 2,048 tokens, micro-batches of 1 and 4; the two held-out cases change the rank, the targets and the
# sequence length. Peaks planned for them run from ~7 to ~64 GiB with liger-kernel's fast path (~9 to ~86 GiB on
# the plain path, --plain), all within one H200.
CASES = [  # in this order, so that a run cut short by --budget still has both kinds and both held-out cases
    Case("lora-4x2048-ckpt", _lora(QKVO), 4, 2048, True),
    Case("qlora-1x2048-ckpt", _qlora(), 1, 2048, True),
    Case("lora-1x1024", _lora(QKVO), 1, 1024, False),
    Case("qlora-4x2048", _qlora(), 4, 2048, False),
    Case("lora-all-r64-4x1024", _lora("all-linear", r=64), 4, 1024, False, held_out=True),
    Case("qlora-2x4096", _qlora(), 2, 4096, False, held_out=True),
    Case("lora-4x2048", _lora(QKVO), 4, 2048, False),
    Case("qlora-1x1024", _qlora(), 1, 1024, False),
    Case("lora-1x2048-ckpt", _lora(QKVO), 1, 2048, True),
    Case("qlora-4x1024-ckpt", _qlora(), 4, 1024, True),
]
# --tiny: the same kinds of case on a tiny model, few enough to run in seconds each on a CPU
TINY_CASES = [
    Case("lora-2x128", _lora(QKVO), 2, 128, False),
    Case("qlora-1x128-ckpt", _qlora(), 1, 128, True),
    Case("lora-all-r8-2x64", _lora("all-linear", r=8), 2, 64, False, held_out=True),
]


# --- setup: the model folder and the data ----------------------------------------------------------------------

def make_model(folder: Path, tiny: bool) -> None:
    """The model folder: random weights from the config (bf16), a small tokenizer trained here."""
    marker = folder / ".complete"
    if marker.exists():
        return
    if tiny:
        from make_tiny_model import make_tiny_model

        make_tiny_model("llama", folder, dtype="bfloat16", max_positions=1024)
    else:
        # In its own process: the parent must not hold GPU memory while the cases run.
        code = (f"import sys; sys.path[:0] = [{str(REPO / 'scripts')!r}, {str(REPO)!r}]; "
                f"from measure_memory import _save_random_model; "
                f"_save_random_model({str(folder)!r}, {json.dumps(LLAMA3_8B)!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    marker.write_text("ok\n")


def _save_random_model(folder: str, config_json: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from make_tiny_model import make_tokenizer

    t0 = time.time()
    tokenizer = make_tokenizer("llama", None, vocab=1024, max_positions=8192)
    config = LlamaConfig(**json.loads(config_json), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialised on the GPU: under a second for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder} (random bf16 weights, hidden {config.hidden_size}, {config.num_hidden_layers} layers) "
          f"in {time.time() - t0:.0f} s", flush=True)


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """`completion` rows of random sentences, 200-1,200 tokens each: packing fills rows with several of them."""
    if path.exists():
        return
    from make_tiny_model import build_corpus

    sentences = [s for s in build_corpus("llama", size=2000) if "\n" not in s and len(s) < 200]
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(rng.choice(sentences) for _ in range(rng.randint(20, 110)))
            f.write(json.dumps({"text": text}) + "\n")


# --- one case, in a child process --------------------------------------------------------------------------------

def child(recipe: str, result: str) -> int:
    """Train `recipe` through peftctl's CLI in this process and write what was measured to `result`.

    The loop's loss functions are wrapped to note the memory around each forward pass; nothing else changes.
    With PEFTCTL_MEASURE_PLAIN=1, liger-kernel is hidden, so the loop takes its plain path.
    """
    if os.environ.get("PEFTCTL_MEASURE_PLAIN") == "1":
        sys.modules["liger_kernel"] = None  # `import liger_kernel...` now raises ImportError
    import torch

    import peftctl.train.loss as loss_module
    from peftctl.cli import app as cli

    records: list[dict] = []
    cuda = torch.cuda.is_available()

    def noting(original):
        def wrapped(model, batch, **kwargs):
            before = torch.cuda.memory_allocated() if cuda else None
            peak_so_far = torch.cuda.max_memory_allocated() if cuda else None
            out = original(model, batch, **kwargs)
            after = torch.cuda.memory_allocated() if cuda else None
            records.append({"loss": original.__name__, "before_forward": before, "after_forward": after,
                            "peak_so_far": peak_so_far, "tokens": int(batch.input_ids.numel())})
            return out
        return wrapped

    # build_loss's lambdas look these up when called: both paths (plain logits, liger's fused loss) are noted
    loss_module.loss_sum = noting(loss_module.loss_sum)
    loss_module.fused_loss_sum = noting(loss_module.fused_loss_sum)
    sys.argv = ["peftctl", "train", recipe, "--log-format", "json", "--force"]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        Path(result).write_text(json.dumps({
            "exit_code": code, "records": records,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }))
    return code


# --- the plan, and the table ------------------------------------------------------------------------------------

@dataclass
class Row:
    case: Case
    plan: dict
    measured: int | None = None
    reserved: int | None = None
    seconds: float = 0.0
    exit_code: int | None = None
    tokens_per_s: float | None = None
    kernels: list = field(default_factory=list)  # run.json's fast_path kernels: what the plan must have assumed
    records: list = field(default_factory=list)
    error: str | None = None

    @property
    def error_pct(self) -> float | None:
        if not self.measured:
            return None
        return 100.0 * (self.plan["peak_bytes"] - self.measured) / self.measured


def plan_for(recipe_path: Path, checkpointing: bool, fast_path: bool | None) -> dict:
    from peftctl.params import count_for_recipe
    from peftctl.plan import Card, activation_bytes, model_shape, plan_memory
    from peftctl.recipe.loader import load_recipe

    recipe = load_recipe(str(recipe_path)).recipe
    counted = count_for_recipe(recipe)
    plan = plan_memory(recipe, counted, card=Card(None, "not checked here"), checkpointing=checkpointing,
                       fast_path=fast_path)
    shape = model_shape(counted.model, counted.config, recipe)
    out = plan.as_dict()
    out["bytes_per_token"] = activation_bytes(shape, plan.setting)
    out["trainable"] = counted.count.trainable
    return out


def run_case(case: Case, work: Path, model: Path, data: Path, steps: int, timeout: int, plain: bool) -> Row:
    recipe_path = work / "recipes" / f"{case.name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = work / "runs" / case.name
    import yaml

    recipe_path.write_text(yaml.safe_dump(case.recipe(model, data, run_dir, steps), sort_keys=False))
    row = Row(case, plan_for(recipe_path, case.checkpointing, fast_path=False if plain else None))
    result = work / "results" / f"{case.name}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_CACHE": str(work / "datasets-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",  # everything is local: never wait on a network
           "PEFTCTL_MEASURE_PLAIN": "1" if plain else "0"}
    t0 = time.time()
    log = work / "logs" / f"{case.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w") as f:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(recipe_path),
                                   "--result", str(result)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, cwd=str(REPO))
        row.exit_code = proc.returncode
    except subprocess.TimeoutExpired:
        row.error = f"timed out after {timeout} s"
    row.seconds = time.time() - t0
    if result.exists():
        measured = json.loads(result.read_text())
        row.measured, row.reserved = measured["max_memory_allocated"], measured["max_memory_reserved"]
        row.records = measured["records"]
    manifest = run_dir / "run.json"
    if manifest.exists():
        run = json.loads(manifest.read_text())
        row.measured = run.get("peak_memory_bytes") or row.measured  # the loop's own figure, where it writes one
        row.tokens_per_s = run.get("tokens_per_s")
        row.kernels = (run.get("fast_path") or {}).get("kernels") or []
    if row.exit_code not in (0, None) and row.error is None:
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        row.error = f"exit code {row.exit_code}: " + " | ".join(tail)[-300:]
    return row


def print_table(rows: list[Row]) -> None:
    head = (f"{'case':22s} {'set':9s} {'plan GiB':>9s} {'measured':>9s} {'error':>8s} {'reserved':>9s} "
            f"{'act. B/tok/layer':>16s} {'tok/s':>8s} {'time':>6s}")
    print(head)
    print("-" * len(head))
    for row in rows:
        measured = f"{row.measured / GiB:9.2f}" if row.measured else f"{'n/a':>9s}"
        error = f"{row.error_pct:+7.1f}%" if row.error_pct is not None else f"{'':>8s}"
        reserved = f"{row.reserved / GiB:9.2f}" if row.reserved else f"{'':>9s}"
        tps = f"{row.tokens_per_s:8,.0f}" if row.tokens_per_s else f"{'':>8s}"
        per_layer = row.plan["bytes_per_token"]["per_layer"]
        print(f"{row.case.name:22s} {'held-out' if row.case.held_out else 'calibrate':9s} "
              f"{row.plan['peak_bytes'] / GiB:9.2f} {measured} {error} {reserved} {per_layer:16,.0f} {tps} "
              f"{row.seconds:5.0f}s" + (f"  {row.error}" if row.error else ""))


def suggested_scale(rows: list[Row]) -> float | None:
    """The ACTIVATION_SCALE that would make the calibration cases right on average: (measured - everything but
    activations) / planned activations, median over the calibration cases."""
    ratios = []
    for row in rows:
        if row.case.held_out or not row.measured:
            continue
        parts = {c["name"]: c["bytes"] for c in row.plan["components"]}
        activations = parts.get("activations", 0)
        if activations > 0:
            ratios.append((row.measured - (row.plan["peak_bytes"] - activations)) / activations)
    return statistics.median(ratios) if ratios else None


def summary(rows: list[Row]) -> dict:
    out = {}
    for name, held in (("calibration", False), ("held_out", True)):
        errors = [abs(r.error_pct) for r in rows if r.case.held_out == held and r.error_pct is not None]
        out[name] = {"cases": len(errors), "max_abs_error_pct": round(max(errors), 2) if errors else None,
                     "within_15pct": all(e <= 15 for e in errors) if errors else None}
    out["suggested_activation_scale"] = suggested_scale(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device: checks the machinery")
    parser.add_argument("--plain", action="store_true", help="hide liger-kernel: measure (and plan) the plain "
                        "path, as on a GPU without peftctl[gpu]")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default /tmp/peftctl-memory, "
                        "or a temporary one with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per case (default 3; 2 with --tiny)")
    parser.add_argument("--budget", type=int, default=420, help="no case starts after this many seconds (the "
                        "default keeps a whole run under ~8 minutes); the ones left are listed as skipped")
    parser.add_argument("--timeout", type=int, default=150, help="seconds for one case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from peftctl.cli.app import _quiet_libraries

    _quiet_libraries()  # the libraries' deprecation notices would drown the table
    if args.child:
        return child(args.child, args.result)

    t_start = time.time()
    cases = TINY_CASES if args.tiny else CASES
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in wanted]
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="peftctl-memory-")) if args.tiny else Path("/tmp/peftctl-memory")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (2 if args.tiny else 3)
    model, data = work / ("tiny-model" if args.tiny else "llama3-8b-random"), work / "data.jsonl"
    make_model(model, args.tiny)
    make_data(data, rows=60 if args.tiny else 400)
    print(f"setup done in {time.time() - t_start:.0f} s; {len(cases)} case(s), {steps} steps each", flush=True)

    rows: list[Row] = []
    skipped = []
    for case in cases:
        if time.time() - t_start > args.budget:
            skipped.append(case.name)
            continue
        row = run_case(case, work, model, data, steps, args.timeout, args.plain)
        rows.append(row)
        measured = f"{row.measured / GiB:.2f} GiB" if row.measured else "n/a"
        print(f"  {case.name}: plan {row.plan['peak_bytes'] / GiB:.2f} GiB, measured {measured} ({row.seconds:.0f} s)"
              + (f" -- {row.error}" if row.error else ""), flush=True)
    print()
    print_table(rows)
    result = summary(rows)
    if skipped:
        print(f"skipped (over the --budget of {args.budget} s): {', '.join(skipped)}")
    for name in ("calibration", "held_out"):
        s = result[name]
        if s["cases"]:
            print(f"{name}: {s['cases']} case(s), largest error {s['max_abs_error_pct']:.1f}% "
                  f"({'within' if s['within_15pct'] else 'NOT within'} 15%)")
    if result["suggested_activation_scale"] is not None:
        print(f"ACTIVATION_SCALE that fits the calibration cases (median): {result['suggested_activation_scale']:.3f}")

    out_dir = os.environ.get("OUT")
    if out_dir:
        import peftctl
        from peftctl.plan.constants import ACTIVATION_SCALE

        report = {"date": time.strftime("%Y-%m-%d"), "peftctl": peftctl.__version__, "tiny": args.tiny,
                  "path": "plain" if args.plain else "fast path where liger-kernel is installed",
                  "steps": steps, "activation_scale_used": ACTIVATION_SCALE, "summary": result, "skipped": skipped,
                  "versions": _versions(), "cases": [_row_dict(r) for r in rows]}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / "memory_plan_vs_measured.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    failed = [r.case.name for r in rows if r.exit_code != 0]
    return 1 if failed else 0


def _row_dict(row: Row) -> dict:
    return {"case": row.case.name, "held_out": row.case.held_out, "method": row.case.method,
            "micro_batch_size": row.case.micro_batch_size, "max_length": row.case.max_length,
            "gradient_checkpointing": row.case.checkpointing, "plan": row.plan, "measured_bytes": row.measured,
            "reserved_bytes": row.reserved, "error_pct": row.error_pct, "tokens_per_s": row.tokens_per_s,
            "seconds": round(row.seconds, 1), "exit_code": row.exit_code, "error": row.error,
            "forward_records": row.records, "fast_path_kernels": row.kernels,
            "lora_dropout_kernel": "lora_dropout_kernel" in row.kernels}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - only informative
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
