"""Train every PEFT method on the same small task for the same number of steps, and print one table.

Each method is an ordinary recipe trained by `python -m peftctl train` in a process of its own -- the path users
take -- so the peak memory of a row is that method's alone: the process's peak RSS on the CPU,
torch.cuda.max_memory_allocated on the GPU (recorded by the run in run.json). Every method sees the same rows
in the same order (packing is off for all, since prefix, prompt and p-tuning cannot pack); learning rates differ
per method, as each method needs its own (see METHODS).

    # CPU, a tiny random Llama-shaped model made on the spot: a few minutes
    python scripts/compare_methods.py

    # GPU, a real model shape (a model folder with weights and tokenizer; random weights do for memory and speed)
    python scripts/compare_methods.py --model /models/Meta-Llama-3-8B --device cuda \\
        --steps 100 --max-length 1024 --micro-batch-size 4 --data recipes/data/demo.jsonl --out runs/compare-8b

Columns: trainable parameters; the training loss (mean of the last 5 logged steps: one step's loss is noisy);
the validation loss at the end; seconds in the training loop and in all (model loading, process start);
peak memory. Runs are kept under --out (each its recipe, run.json, metrics and log). --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "data" / "demo.jsonl"

# (row label, method section, learning rate on a tiny random model, on a real model). Tiny random models need
# rates far above the usual ones to move in a few dozen steps; the real-model rates are those of recipes/.
METHODS: list[tuple[str, dict, float, float]] = [
    ("lora", {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
              "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}, 5e-3, 2e-4),
    ("lora + dora", {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                     "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "use_dora": True}, 5e-3, 2e-4),
    ("lora + rslora (r 64)", {"name": "lora", "r": 64, "alpha": 16, "dropout": 0.0,
                              "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "use_rslora": True}, 5e-3, 2e-4),
    ("lora + loraplus 16", {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                            "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "loraplus_lr_ratio": 16},
     1e-3, 5e-5),
    ("qlora (all-linear)", {"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
     5e-3, 2e-4),
    ("prefix_tuning", {"name": "prefix_tuning", "num_virtual_tokens": 20}, 1e-1, 1e-2),
    ("prefix_tuning + projection", {"name": "prefix_tuning", "num_virtual_tokens": 20, "projection": True},
     3e-2, 1e-3),
    ("prompt_tuning (text init)", {"name": "prompt_tuning", "num_virtual_tokens": 20,
                                   "prompt_init_text": "Answer the instruction helpfully and concisely."},
     1e-1, 3e-2),
    ("p_tuning (mlp)", {"name": "p_tuning", "num_virtual_tokens": 20, "encoder_type": "mlp"}, 5e-3, 1e-3),
    ("ia3", {"name": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward_targets": ["down_proj"]},
     5e-2, 3e-3),
    ("adapter (houlsby)", {"name": "adapter", "placement": "houlsby", "reduction_factor": 16}, 5e-3, 1e-4),
    ("adapter (pfeiffer)", {"name": "adapter", "placement": "pfeiffer", "reduction_factor": 16}, 5e-3, 1e-4),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random llama made in --out)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", type=Path, default=DEMO_DATA, help="alpaca-format jsonl (default: the demo task)")
    parser.add_argument("--validation", type=float, default=0.1, help="fraction held out for the validation loss")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="model.dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated row labels or method names to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare_methods")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    return parser.parse_args(argv)


def tiny_model(out: Path) -> Path:
    folder = out / "tiny-llama"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(REPO / "scripts"))
        from make_tiny_model import make_tiny_model

        make_tiny_model("llama", folder, corpus=DEMO_DATA)
    return folder


def write_recipe(path: Path, args, model: str, method: dict, learning_rate: float) -> None:
    recipe = {
        "model": {"name": str(model), "dtype": args.dtype or ("float32" if args.device == "cpu" else "bfloat16")},
        "method": method,
        "dataset": {"path": str(Path(args.data).resolve()), "format": "alpaca", "validation": args.validation,
                    "max_length": args.max_length, "packing": False},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch_size,
                     "gradient_accumulation": args.gradient_accumulation, "learning_rate": learning_rate,
                     "lr_scheduler": "cosine", "warmup_steps": max(1, args.steps // 10),
                     "gradient_checkpointing": False, "eval_every": args.steps, "save_every": args.steps + 1,
                     "seed": 0},
        "output": {"dir": str(path.parent / "run")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {method['name']}: written by scripts/compare_methods.py\n"
                    + yaml.safe_dump(recipe, sort_keys=False))


def run_one(label: str, method: dict, learning_rate: float, args, model: str) -> dict:
    folder = args.out / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
    recipe = folder / "recipe.yaml"
    write_recipe(recipe, args, model, method, learning_rate)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the library trains on a GPU whenever it sees one
    row = {"method": label, "learning_rate": learning_rate}
    start = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "peftctl", "train", str(recipe), "--force", "--quiet"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        # wait4 gives this child's own resource usage: its peak RSS, not the largest of all children so far.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    row["total_s"] = time.perf_counter() - start
    row["peak_rss_bytes"] = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    manifest_path = folder / "run" / "run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if proc.returncode != 0:
        tail = (folder / "train.log").read_text().strip().splitlines()[-1:] or [""]
        row["error"] = f"exit {proc.returncode}: {tail[0][:100]}"
        return row
    losses = [json.loads(line)["loss"] for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()
              if line.strip() and "loss" in json.loads(line)]
    row.update(trainable=manifest["params"]["trainable"], percent=manifest["params"]["percent"],
               train_loss=sum(losses[-5:]) / len(losses[-5:]), first_loss=losses[0],
               eval_loss=manifest["final"]["eval_loss"], train_s=manifest["timings"]["train_s"],
               device=manifest["device"], peak_cuda_bytes=manifest.get("peak_memory_bytes"))
    if args.device == "cuda" and str(row["device"]).startswith("cpu"):
        row["error"] = "ran on the CPU: no GPU visible"
    return row


def table(rows: list[dict], device: str) -> str:
    memory = "peak GPU memory" if device == "cuda" else "peak RSS"
    lines = [f"| method | trainable | % | train loss (first -> last 5) | val loss | train s | total s | {memory} |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        peak = r["peak_cuda_bytes"] if device == "cuda" else r["peak_rss_bytes"]
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {r['first_loss']:.2f} -> "
                     f"{r['train_loss']:.3f} | {r['eval_loss']:.3f} | {r['train_s']:.1f} | {r['total_s']:.1f} | "
                     f"{_gib(peak)} |")
    return "\n".join(lines)


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(tiny_model(args.out))
    real = args.model is not None
    wanted = set(args.methods.split(",")) if args.methods else None
    rows = []
    for label, method, lr_tiny, lr_real in METHODS:
        if wanted and label not in wanted and method["name"] not in wanted:
            continue
        row = run_one(label, method, lr_real if real else lr_tiny, args, model)
        rows.append(row)
        done = row.get("error") or f"train loss {row['train_loss']:.3f}, val loss {row['eval_loss']:.3f}"
        print(f"{label}: {done} ({row['total_s']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{args.steps} steps x {args.micro_batch_size * args.gradient_accumulation} rows of up to "
          f"{args.max_length} tokens, {Path(args.data).name}, {model}, {args.device}\n")
    print(table(rows, args.device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
