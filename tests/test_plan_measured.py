"""The memory plan against peaks measured on one H200 (tests/data/measured/, 2026-11-28, by
scripts/measure_memory.py): within 15%, the held-out recipes included. The plan is computed here, on the CPU,
for the GPU's fast path each row ran with (its `lora_dropout_kernel`); a change to the plan that drifts from what
was measured fails this test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peftctl.plan import Card, plan_memory
from peftctl.recipe.loader import parse_recipe

DATA = Path(__file__).parent / "data"
MEASURED = json.loads((DATA / "measured" / "memory_h200_2026-11-28.json").read_text())
GiB = 2 ** 30


def plan_for(case: dict):
    m = case["method"]
    # measured with the input embedding on the GPU (before model.input_embeddings: auto moved it for qlora-*-ckpt)
    recipe = {"model": {"name": str(DATA / "configs" / "llama-3-8b"), "dtype": "bfloat16", "input_embeddings": "gpu"},
              "method": {"name": m["name"], "r": m.get("r", 16), "alpha": m.get("alpha", 32), "dropout": 0.05,
                         "targets": m["targets"]},
              "dataset": {"path": "org/data", "format": "completion", "max_length": case["max_length"],
                          "validation": 0},
              "training": {"micro_batch_size": case["micro_batch_size"],
                           "gradient_checkpointing": case["gradient_checkpointing"]},
              "output": {"dir": "/tmp/plan"}}
    if m["name"] == "qlora":  # measured before quantization.keep_dequantized existed: the matrices not kept
        recipe["quantization"] = {"bits": 4, "keep_dequantized": case.get("keep_dequantized", False)}
    loaded = parse_recipe(yaml.safe_dump(recipe), "measured.yaml", Path.cwd(), check_paths=False)
    # planned for the fast path each row ran with (the LoRA dropout kernel came later: rows without it say so)
    return plan_memory(loaded.recipe, card=Card(139 * GiB, "NVIDIA H200"), fast_path=True,
                       triton=case["lora_dropout_kernel"])


@pytest.mark.parametrize("case", MEASURED["cases"], ids=[c["case"] for c in MEASURED["cases"]])
def test_plan_within_15_percent_of_the_measured_peak(case):
    plan = plan_for(case)
    error = plan.peak / case["measured_bytes"] - 1
    assert abs(error) <= 0.15, f"{case['case']}: plan {plan.peak / GiB:.2f} GiB, measured " \
                               f"{case['measured_bytes'] / GiB:.2f} GiB ({100 * error:+.1f}%)"
    assert plan.fits is True


def test_the_measurements_include_held_out_recipes():
    held_out = [c["case"] for c in MEASURED["cases"] if c["held_out"]]
    assert held_out == ["lora-all-r64-4x1024", "qlora-2x4096"]
