"""The serving note: vLLM's real LoRA rules and llama.cpp's converter, judged from the adapter folder written and the
base's architecture."""

from __future__ import annotations

import json

import pytest

from peftctl.serving import serving_check, vllm_max_lora_rank

LLAMA = ["LlamaForCausalLM"]


def check(tmp_path, architectures=LLAMA, quantization=None, **config):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return serving_check(tmp_path, architectures, quantization)


@pytest.mark.parametrize("r, needed", [(1, 1), (8, 8), (16, 16), (17, 32), (24, 32), (300, 320), (512, 512),
                                       (513, None), (1024, None)])
def test_max_lora_rank_is_one_vllm_accepts(r, needed):
    assert vllm_max_lora_rank(r) == needed


def test_a_plain_llama_lora_is_ready_everywhere(tmp_path):
    assert check(tmp_path) == {"vllm_lora_ready": True, "vllm_max_lora_rank": 8, "llama_cpp_ready": True,
                               "notes": []}


def test_rank_24_needs_max_lora_rank_32_and_1024_cannot_be_served(tmp_path):
    report = check(tmp_path, r=24)
    assert report["vllm_lora_ready"] and report["vllm_max_lora_rank"] == 32
    assert "--max-lora-rank 32" in report["notes"][0] and "--max-lora-rank 24" not in " ".join(report["notes"])
    report = check(tmp_path, r=1024)
    assert not report["vllm_lora_ready"] and report["vllm_max_lora_rank"] is None
    assert "above the largest --max-lora-rank" in report["notes"][0] and "merged/" in report["notes"][0]


def test_gpt2_has_no_lora_in_vllm(tmp_path):
    report = check(tmp_path, architectures=["GPT2LMHeadModel"])
    assert not report["vllm_lora_ready"] and "no LoRA support for GPT2LMHeadModel" in report["notes"][0]
    report = check(tmp_path, architectures=["SomethingNewForCausalLM"])  # not known either way: not claimed ready
    assert not report["vllm_lora_ready"] and "not known" in report["notes"][0]


def test_qlora_is_served_with_the_caveat_that_merged_is_the_trained_model(tmp_path):
    report = check(tmp_path, quantization={"bits": 4, "quant_type": "nf4"})
    assert report["vllm_lora_ready"]
    assert any("4-bit base" in note and "merged/" in note for note in report["notes"])


@pytest.mark.parametrize("config, vllm_ready, llama_cpp_ready, says", [
    ({"use_dora": True}, False, False, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, False, True, "modules_to_save"),
    ({"lora_bias": True}, False, True, "bias"),
    ({"use_rslora": True}, True, False, "2.8x too weakly at r 8"),
    ({"peft_type": "IA3"}, False, False, "only LoRA"),
    ({"peft_type": "PREFIX_TUNING"}, False, False, "peft"),
])
def test_what_vllm_refuses_and_llama_cpp_converts_wrongly(tmp_path, config, vllm_ready, llama_cpp_ready, says):
    report = check(tmp_path, **config)
    assert report["vllm_lora_ready"] is vllm_ready and report["llama_cpp_ready"] is llama_cpp_ready
    assert any(says in note for note in report["notes"]), report["notes"]
    if not llama_cpp_ready:
        assert any("convert merged/" in note for note in report["notes"])


def test_a_bottleneck_adapter_is_not_a_vllm_adapter(tmp_path):
    report = serving_check(tmp_path, LLAMA, None)  # no adapter_config.json: peftctl's own format
    assert not report["vllm_lora_ready"] and not report["llama_cpp_ready"]
