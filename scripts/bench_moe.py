"""LoRA on a mixture-of-experts model through `peftctl train`: peak memory beside the memory plan's estimate.

Builds a Mixtral-shaped model with random weights (about 4.6B parameters by default: 16 layers, 8 experts of
width 5632, top-2), writes it as a bf16 model folder, trains LoRA on attention and experts (`targets: all-linear`)
for a few steps on synthetic text, and prints run.json's peak beside `count-params --memory`'s estimate.

    PYTHONPATH=$PWD/.gpu-site:$PWD python scripts/bench_moe.py --out /tmp/bench-moe   # one H200, ~3 minutes
    PYTHONPATH=$PWD python scripts/bench_moe.py --shrink --out /tmp/bench-moe-cpu      # CPU smoke run, tiny shape
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
            intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2)
SHRUNK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)


def synthetic_data(path: Path, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = "the cat dog river house plan model expert token route layer paint quiet bright slow".split()
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def main(argv=None) -> int:
    import yaml

    from tiny_families import make_family_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shrink", action="store_true", help="a tiny shape, float32 (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["true", "false"], default="true")
    args = parser.parse_args(argv)
    shape, dtype = (SHRUNK, "float32") if args.shrink else (FULL, "bfloat16")
    max_length = 64 if args.shrink else args.max_length
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    if not (model_dir / "config.json").exists():
        make_family_model("mixtral", model_dir, dtype=dtype, init_std=0.02, **shape)
    data = args.out / "data.jsonl"
    synthetic_data(data, rows=64, words=max_length)
    run_dir = args.out / "run"
    recipe = {
        "model": {"name": str(model_dir), "dtype": dtype},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        # packing left at the user's default (auto): the bench shows whether the model packs on its own merit
        "dataset": {"path": str(data), "format": "completion", "validation": 0.0, "max_length": max_length},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch_size, "gradient_accumulation": 1,
                     "learning_rate": 1e-4, "warmup_steps": 0, "save_every": 10_000, "eval_every": 10_000,
                     "gradient_checkpointing": args.checkpointing == "true"},
        "output": {"dir": str(run_dir)},
    }
    recipe_path = args.out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    from peftctl.params import count_for_recipe
    from peftctl.plan import plan_memory
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    loaded = load_recipe(str(recipe_path), [])
    counted = count_for_recipe(loaded.recipe)
    plan = plan_memory(loaded.recipe, counted, checkpointing=args.checkpointing == "true")
    train(loaded, TrainOptions(quiet=True, force=True))
    manifest = json.loads((run_dir / "run.json").read_text())
    peak = manifest.get("peak_memory_bytes")
    total = counted.count.total
    print(f"mixtral-shaped, {total / 1e9:.2f}B parameters, {shape['num_local_experts']} experts (top "
          f"{shape['num_experts_per_tok']}), lora r16 all-linear (attention + experts), {args.micro_batch_size} x "
          f"{max_length} tokens, checkpointing {args.checkpointing}, {manifest['steps_done']} steps")
    for c in plan.components:
        print(f"  plan {c.name:<20} {c.bytes / 2 ** 30:8.2f} GiB  {c.detail}")
    print(f"plan peak {plan.peak / 2 ** 30:.2f} GiB; measured peak "
          + (f"{peak / 2 ** 30:.2f} GiB ({(peak - plan.peak) / plan.peak:+.1%})" if peak else "n/a (no CUDA)"))
    print(f"packed rows: {manifest['data']['packed']}")
    print(f"tokens/s {manifest.get('tokens_per_s') or manifest.get('throughput', '')}; "
          f"run.json: {run_dir / 'run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
