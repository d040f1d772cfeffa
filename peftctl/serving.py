"""Will the adapter a run wrote serve as it is? vLLM's LoRA rules and llama.cpp's converter, judged from the adapter
folder (adapter_config.json) and the base's architecture, so nobody finds out at deployment.

The rules, as read in their sources (vLLM 0.1x-0.2x, llama.cpp's convert_lora_to_gguf.py, 2026):
- vLLM's `--max-lora-rank` is a closed set (`MaxLoRARanks` in vllm/config/lora.py): 1, 8, 16, 32, 64, 128, 256, 320,
  512, default 16. A larger rank cannot be served at all.
- vLLM loads LoRA only into models that implement `SupportsLoRA`; GPT-2, GPT-NeoX and Falcon do not.
- vLLM's PEFTHelper refuses DoRA and `modules_to_save`; it loads no IA3, prompt or prefix adapters.
- llama.cpp's converter reads `lora_alpha` and its runtime scales by alpha / r: an rsLoRA adapter (alpha / sqrt(r))
  converts without error but acts sqrt(r) times too weakly. It converts neither DoRA's magnitudes nor IA3.
Where an adapter falls short, merged/ (`peftctl merge`) is a plain model folder that both serve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Architectures (config.json's `architectures`) whose vLLM model class implements SupportsLoRA ...
VLLM_LORA_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GraniteForCausalLM",
})
# ... and those whose class does not.
VLLM_NO_LORA_ARCHITECTURES = frozenset({"GPT2LMHeadModel", "GPTNeoXForCausalLM", "FalconForCausalLM"})

MERGE = "merge it (`peftctl merge RUN`, or output.merge: true) and serve merged/"


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts for rank r; None above the largest."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= r), None)


def serving_check(adapter_dir: Path, architectures: list[str] | None, quantization: dict | None) -> dict:
    """{vllm_lora_ready, vllm_max_lora_rank, llama_cpp_ready, notes}: `notes` say what falls short and what to do."""
    config = _adapter_config(Path(adapter_dir))
    kind = config.get("peft_type") or "BOTTLENECK"
    vllm, rank, caveats = _vllm(config, kind, architectures or [], quantization)
    llama_cpp = _llama_cpp(config, kind)
    return {"vllm_lora_ready": not vllm, "vllm_max_lora_rank": rank, "llama_cpp_ready": not llama_cpp,
            "notes": vllm + caveats + llama_cpp}


def _adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}  # our bottleneck adapter (bottleneck_config.json) or an unreadable folder


def _vllm(config: dict, kind: str, architectures: list[str], quantization: dict | None):
    """(what vLLM refuses, the --max-lora-rank it needs, caveats that do not stop it)."""
    if kind != "LORA":
        what = {"BOTTLENECK": "bottleneck adapters (peftctl's own format)"}.get(kind, f"{kind.lower()} adapters")
        fix = MERGE if kind == "IA3" else "serve them with the base through peft"
        return [f"vLLM serves only LoRA adapters, not {what}: {fix}"], None, []
    refused, caveats = [], []
    arch = ", ".join(architectures) or "unknown"
    if any(a in VLLM_NO_LORA_ARCHITECTURES for a in architectures):
        refused.append(f"vLLM has no LoRA support for {arch}: {MERGE}")
    elif not any(a in VLLM_LORA_ARCHITECTURES for a in architectures):
        refused.append(f"vLLM's LoRA support for {arch} is not known to peftctl (check the LoRA column of vLLM's "
                       f"supported models), or {MERGE}")
    if config.get("use_dora"):
        refused.append(f"vLLM does not serve DoRA adapters: {MERGE}")
    if config.get("modules_to_save"):
        refused.append(f"modules_to_save ({', '.join(config['modules_to_save'])}) are full copies that vLLM refuses "
                       f"in a LoRA adapter: {MERGE}")
    if config.get("lora_bias"):
        refused.append(f"vLLM refuses LoRA adapters with a bias: {MERGE}")
    r = int(config.get("r") or 0)
    rank = vllm_max_lora_rank(r)
    if rank is None:
        refused.append(f"rank {r} is above the largest --max-lora-rank vLLM accepts ({VLLM_MAX_LORA_RANKS[-1]}): "
                       f"{MERGE}")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        caveats.append(f"rank {r} is above vLLM's default --max-lora-rank of {VLLM_DEFAULT_MAX_LORA_RANK}: serve "
                       f"with --max-lora-rank {rank} (it accepts only {', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    if quantization:
        caveats.append(f"the adapter was trained on a {quantization.get('bits', 4)}-bit base: on the full-precision "
                       "base (what vLLM loads) it is not quite the model that was trained; merged/ (merged onto the "
                       "dequantised weights) is")
    return refused, (rank if not refused else None), caveats


def _llama_cpp(config: dict, kind: str) -> list[str]:
    """What llama.cpp's convert_lora_to_gguf.py gets wrong or refuses for this adapter."""
    fix = "convert merged/ with convert_hf_to_gguf.py instead"
    if kind != "LORA":
        return [f"llama.cpp's convert_lora_to_gguf.py converts only LoRA adapters: {fix}"]
    if config.get("use_dora"):
        return [f"llama.cpp's convert_lora_to_gguf.py does not convert DoRA's magnitude vectors: {fix}"]
    if config.get("use_rslora"):
        r = int(config.get("r") or 1)
        return [f"llama.cpp scales a converted adapter by alpha / r, but rsLoRA trained it with alpha / sqrt(r): it "
                f"would act {math.sqrt(r):.1f}x too weakly at r {r}; {fix}"]
    return []
