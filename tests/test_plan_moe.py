"""The memory plan of a mixture-of-experts model, against closed forms for Mixtral-8x7B (its published config):
every expert's weights are resident, activations follow the routed top-k experts, and peft's parameter wrapper
keeps W + B @ A of the adapted expert tensors for the backward pass."""

from __future__ import annotations

import dataclasses
import json

import pytest

from test_count_params import CONFIGS
from test_plan import make_recipe, shape_and_setting

MIXTRAL = CONFIGS / "mixtral-8x7b"
H, INTER, LAYERS, HEADS, KV, VOCAB, EXPERTS, TOP_K = 4096, 14336, 32, 32, 8, 32000, 8, 2
ATTENTION = 2 * H * H + 2 * (H // HEADS * KV) * H  # q, o; k, v
EXPERT_WEIGHTS = EXPERTS * 3 * H * INTER  # gate_up_proj (E, 2I, H) + down_proj (E, H, INTER)


def _mixtral(tmp_path, **changes):
    """Mixtral-8x7B's config folder, with `changes` to its keys."""
    if not changes:
        return MIXTRAL
    config = {**json.loads((MIXTRAL / "config.json").read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _plan(folder, checkpointing=False):
    from peftctl import plan

    recipe = make_recipe(str(folder), {"name": "lora", "r": 16, "dropout": 0.0, "targets": "all-linear"},
                         micro_batch_size=1, max_length=2048)
    shape, setting = shape_and_setting(recipe, checkpointing=checkpointing)
    setting = dataclasses.replace(setting, checkpointing=checkpointing)
    return shape, setting, {c.name: c.bytes for c in plan.estimate(shape, setting, "lora")}


def test_mixtral_8x7b_weights_hold_every_expert():
    shape, setting, components = _plan(MIXTRAL)
    per_layer = ATTENTION + EXPERT_WEIGHTS + EXPERTS * H + 2 * H  # + router, two RMSNorms
    total = LAYERS * per_layer + 2 * VOCAB * H + H  # + embeddings, lm_head, final norm
    assert total == 46_702_792_704  # Mixtral-8x7B's published size
    assert shape.experts == (EXPERTS, TOP_K) and shape.moe_layers == LAYERS
    assert components["base weights"] == 2 * total  # bf16, all eight experts of every layer


def test_mixtral_8x7b_activations_follow_the_routed_experts():
    from peftctl import plan

    shape, setting, _ = _plan(MIXTRAL)
    assert shape.intermediate == TOP_K * INTER  # a token goes through its top-2 experts, not all eight
    assert shape.mlp_saved == 3  # the experts are gated (SwiGLU) though fused: gate, act(gate), up
    assert plan.activation_bytes(shape, setting)["mlp"] == 2 * 3 * TOP_K * INTER  # bf16


@pytest.mark.parametrize("changes, weights_grow, mlp_scale", [
    ({"num_local_experts": 16}, True, 1),   # twice the experts, same top-2: more weights, same activations
    ({"num_experts_per_tok": 4}, False, 2),  # top-4 of the same eight: same weights, twice the MLP's activations
])
def test_weights_scale_with_all_experts_and_activations_with_top_k(changes, weights_grow, mlp_scale, tmp_path):
    from peftctl import plan

    shape, setting, components = _plan(MIXTRAL)
    other_shape, other_setting, other = _plan(_mixtral(tmp_path, **changes))
    extra_experts = changes.get("num_local_experts", EXPERTS) - EXPERTS
    extra = LAYERS * extra_experts * (3 * H * INTER + H)  # their weights and router rows
    assert other["base weights"] - components["base weights"] == 2 * extra
    assert (extra > 0) is weights_grow
    mlp, other_mlp = (plan.activation_bytes(s, t)["mlp"] for s, t in ((shape, setting), (other_shape, other_setting)))
    assert other_mlp == mlp_scale * mlp


def test_expert_deltas_are_the_adapted_expert_tensors_of_the_layers_kept():
    shape, _, components = _plan(MIXTRAL)
    assert shape.expert_delta == EXPERT_WEIGHTS  # all-linear adapts both expert tensors of every expert
    assert components["expert deltas"] == 2 * EXPERT_WEIGHTS * LAYERS  # bf16, every layer's kept for backward
    _, _, checkpointed = _plan(MIXTRAL, checkpointing=True)
    assert checkpointed["expert deltas"] == 2 * EXPERT_WEIGHTS  # the one layer being recomputed


def test_attention_only_targets_have_no_expert_deltas():
    from peftctl import plan

    recipe = make_recipe(str(MIXTRAL), {"name": "lora", "r": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]})
    shape, setting = shape_and_setting(recipe)
    assert shape.expert_delta == 0 and shape.experts == (EXPERTS, TOP_K)
    assert "expert deltas" not in {c.name for c in plan.estimate(shape, setting, "lora")}


def test_kept_4bit_matrices_count_the_attention_layers_not_the_expert_tensors():
    """quantization.keep_dequantized on Mixtral QLoRA all-linear: the fused branch computes q, k, v and o over
    their 4-bit linear bases; the expert tensors go through peft's parameter wrapper (and bitsandbytes leaves them
    unquantised), so none of them is kept."""
    from peftctl.plan.estimate import kept_matrices

    recipe = make_recipe(str(MIXTRAL), {"name": "qlora", "r": 16, "dropout": 0.0, "targets": "all-linear"},
                         quantization={"bits": 4, "keep_dequantized": True}, micro_batch_size=1, max_length=2048)
    shape, setting = shape_and_setting(recipe, checkpointing=False)
    assert kept_matrices(shape, setting) == (4 * LAYERS, 2 * LAYERS * ATTENTION)
