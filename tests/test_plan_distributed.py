"""The memory plan for one GPU of a distributed run (peftctl/plan.py per_gpu): DDP keeps what one process keeps
plus its gradient buckets; FSDP2 divides the base, adapter and optimiser over the GPUs but not the activations,
and keeps the root and two decoder layers unsharded. Computed on the CPU for the Llama-3-8B shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftctl.plan import Card, plan_memory
from peftctl.recipe.loader import parse_recipe

DATA = Path(__file__).parent / "data"
GiB = 2 ** 30
H200 = Card(139 * GiB, "NVIDIA H200")


def recipe(**training):
    raw = {"model": {"name": str(DATA / "configs" / "llama-3-8b"), "dtype": "bfloat16"},
           "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05,
                      "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "dataset": {"path": "org/data", "format": "completion", "max_length": 2048, "validation": 0},
           "training": {"micro_batch_size": 4, "gradient_checkpointing": False, **training},
           "output": {"dir": "/tmp/plan"}}
    return parse_recipe(yaml.safe_dump(raw), "dist.yaml", Path.cwd(), check_paths=False).recipe


def parts(plan) -> dict:
    return {c.name: c.bytes for c in plan.components}


def test_ddp_keeps_one_process_plus_its_gradient_buckets():
    one = plan_memory(recipe(), card=H200, fast_path=True)
    ddp = plan_memory(recipe(), card=H200, fast_path=True, world_size=2, engine="ddp")
    trainable = parts(one)["adapter weights"] // 4
    assert parts(ddp)["DDP gradient buckets"] == 4 * trainable
    assert ddp.peak == one.peak + 4 * trainable
    assert "DDP over 2 GPUs" in ddp.setting.describe()


@pytest.mark.parametrize("n", [2, 4])
def test_fsdp_divides_weights_and_optimiser_but_not_activations(n):
    one = plan_memory(recipe(), card=H200, fast_path=True)
    fsdp = plan_memory(recipe(), card=H200, fast_path=True, world_size=n, engine="fsdp")
    a, b = parts(one), parts(fsdp)
    for name in ("base weights", "adapter weights", "AdamW states"):
        assert b[name] == a[name] // n
    assert b["activations"] == a["activations"] and b["logits and loss"] == a["logits and loss"]
    # unsharded at the peak: embeddings + head (2 x 128256 x 4096 bf16 = 1.96 GiB) and two of 32 layers
    layer = (a["base weights"] - 2 * 128256 * 4096 * 2) / 32
    assert b["FSDP unsharded"] == pytest.approx(2 * 128256 * 4096 * 2 + 2 * layer, rel=0.01)
    saved = a["base weights"] - b["base weights"] - b["FSDP unsharded"]
    assert fsdp.peak == pytest.approx(one.peak - saved - (a["adapter weights"] - b["adapter weights"])
                                      - (a["AdamW states"] - b["AdamW states"])
                                      - (a["gradients"] - b["gradients"]), abs=8)
    assert fsdp.peak < one.peak


def test_fsdp_with_the_same_global_batch_halves_the_activations_too():
    """The FSDP2 target of BENCHMARKS.md (per-GPU peak <= 0.6x one GPU's) needs the global batch kept: 2 rows per
    GPU."""
    one = plan_memory(recipe(), card=H200, fast_path=True)
    fsdp = plan_memory(recipe(micro_batch_size=2), card=H200, fast_path=True, world_size=2, engine="fsdp")
    same_rows = plan_memory(recipe(), card=H200, fast_path=True, world_size=2, engine="fsdp")
    assert fsdp.peak / one.peak < 0.6 < same_rows.peak / one.peak


def test_one_process_ignores_the_engine():
    assert plan_memory(recipe(), card=H200, fast_path=True, world_size=1, engine="fsdp").peak == \
        plan_memory(recipe(), card=H200, fast_path=True).peak
