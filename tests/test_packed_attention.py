"""The attention kernel for packed rows (peftctl/packed_attention.py, the rule in peftctl/fast_path.py).

There is no GPU here, so torch's varlen kernel is replaced by a CPU reference (causal SDPA over each document
alone): what is tested is ours -- collate's document lengths, the wrapper's reshaping and GQA handling, the
keyword arguments reaching every layer, the probe and the fallback, and what run.json records. The real kernel is
tested in tests/test_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftctl import fast_path, packed_attention
from peftctl.data.packing import collate, model_inputs


def reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """torch 2.11's varlen_attn signature, computed per document with causal SDPA on the CPU."""
    import torch.nn.functional as F

    assert cu_q.dtype == torch.int32 and window_size == (-1, 0), "called as a causal varlen kernel"
    assert int((cu_q[1:] - cu_q[:-1]).max()) == max_q
    out = torch.empty_like(query)
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                        enable_gqa=enable_gqa).transpose(0, 1)
    return out


def reference_without_gqa(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
    """torch 2.10's form: is_causal=, and no enable_gqa (the wrapper must repeat the key/value heads)."""
    assert is_causal and query.shape[1] == key.shape[1]
    return reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0))


def reference_flash_211(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn as it is: window_size=, no enable_gqa, and the flash kernel takes fewer key/value
    heads than query heads as they are."""
    reference_flash_211.kv_heads_seen.append(key.shape[1])
    return reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                            enable_gqa=key.shape[1] != query.shape[1])


reference_flash_211.kv_heads_seen = []


def example(n: int, start: int = 5) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] + ids[1:]}


def test_collate_gives_document_lengths_with_the_trailing_padding_as_one_more():
    batch = collate([[example(3), example(4)], [example(5)]], pad_id=0, packed=True, pad_to=10)
    assert batch.cu_seq_lens.dtype == torch.int32
    # row 0: 3, 4, then 3 of padding; row 1: 5, then 5 of padding -- over the rows laid end to end
    assert batch.cu_seq_lens.tolist() == [0, 3, 7, 10, 15, 20]
    assert batch.max_length == 5
    # the documents are exactly where position_ids restart
    starts = (batch.position_ids.flatten() == 0).nonzero().flatten().tolist()
    assert starts == batch.cu_seq_lens[:-1].tolist()
    full = collate([[example(4), example(6)]], pad_id=0, packed=True)
    assert full.cu_seq_lens.tolist() == [0, 4, 10] and full.max_length == 6
    assert collate([[example(4)], [example(6)]], pad_id=0, packed=False).cu_seq_lens is None


def test_model_inputs_pass_the_documents_only_to_a_varlen_model():
    batch = collate([[example(3), example(4)]], pad_id=0, packed=True)
    assert "cu_seq_lens_q" not in model_inputs(batch, prompt_learning=False)
    inputs = model_inputs(batch, prompt_learning=False, documents=True)
    assert inputs["cu_seq_lens_q"] is batch.cu_seq_lens and inputs["max_length_k"] == 4


@pytest.fixture
def cpu_varlen(monkeypatch):
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: reference_varlen)


def _tiny_llama(kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kernel, name", [(reference_varlen, packed_attention.VARLEN),
                                          (reference_flash_211, packed_attention.VARLEN),
                                          (reference_without_gqa, packed_attention.VARLEN_REPEAT_KV)],
                         ids=["window_size+gqa", "heads-as-they-are", "is_causal+repeated"])
def test_a_tiny_llama_through_the_varlen_wrapper_gets_the_logits_of_each_example_alone(monkeypatch, kernel, name):
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: kernel)
    model = _tiny_llama()
    examples = [example(7), example(5, 40), example(9, 80), example(6, 120)]
    batch = collate([examples[:2], examples[2:]], pad_id=0, packed=True, pad_to=16)
    packed_attention.set_attention(model, name)
    assert packed_attention.uses_documents(model)
    with torch.no_grad():
        packed = model(**model_inputs(batch, prompt_learning=False, documents=True)).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
        leaky = model(**model_inputs(batch, prompt_learning=False)).logits  # no lengths: plain causal
    got = [packed[0, :7], packed[0, 7:12], packed[1, :9], packed[1, 9:15]]
    for g, want in zip(got, alone):
        assert g.argmax(-1).tolist() == want.argmax(-1).tolist()
        assert torch.allclose(g, want, atol=1e-4, rtol=1e-4)
    # and the check means something: without the lengths the second example reads the first
    assert not torch.allclose(leaky[0, 7:12], alone[1], atol=1e-2)
    # the isolation check runs through the chosen kernel
    from peftctl.model import check_packing_isolation

    assert check_packing_isolation(model, torch.device("cpu"), 300)[0]


def test_the_probe_passes_the_reference_and_catches_a_kernel_that_leaks(monkeypatch, cpu_varlen):
    shape = {"heads": 4, "kv_heads": 2, "head_dim": 16, "rows": 2, "length": 40}
    assert packed_attention.probe("varlen", shape, torch.device("cpu"), torch.float32) is None

    def leaky(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        rows = torch.tensor([0, 40, 80], dtype=torch.int32)  # one document per row: a leak
        return reference_varlen(query, key, value, rows, rows, 40, 40, scale=scale, window_size=window_size,
                                enable_gqa=enable_gqa)

    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: leaky)
    why = packed_attention.probe("varlen", shape, torch.device("cpu"), torch.float32)
    assert why.startswith("output differs from SDPA with a block mask")


def test_the_rule_keeps_sdpa_where_the_kernels_do_not_compute_the_same():
    from transformers import MistralConfig, Qwen2Config

    def rule(model_type="llama", config=None, **kw):
        refusal = fast_path.document_kernel_refusal(model_type, config or object(), 2048)
        args = dict(setting="auto", packed=True, device_type="cuda", dtype="bfloat16", refusal=refusal,
                    torch_at=(2, 11))
        return fast_path.packed_attention_candidates(**{**args, **kw})

    assert rule()[0] == ["varlen", "flex_attention", "sdpa"]
    assert rule(device_type="cpu") == (["sdpa"], [])
    assert rule(packed=False) == (["sdpa"], [])
    assert rule(setting="eager") == (["eager"], [])
    assert rule(dtype=None)[0] == ["sdpa"]
    assert rule(torch_at=(2, 9))[0] == ["flex_attention", "sdpa"]
    candidates, refused = rule("gemma2")
    assert candidates == ["sdpa"] and "not on the list" in refused[0]["refused"]
    assert "sliding window" in rule("mistral", MistralConfig(sliding_window=1024))[1][0]["refused"]
    assert rule("mistral", MistralConfig(sliding_window=4096))[0][0] == "varlen"  # wider than a row
    assert rule("qwen2", Qwen2Config(use_sliding_window=False, sliding_window=1024))[0][0] == "varlen"
    assert rule("qwen2", Qwen2Config(attention_dropout=0.1))[0] == ["sdpa"]


def _fallback_run(tiny_model, write_recipe, monkeypatch, kernel):
    """A packed run on the CPU with the rule told it is on a GPU (candidates varlen then sdpa) and `kernel` in
    place of torch's varlen."""
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    real_rule = fast_path.packed_attention_candidates
    monkeypatch.setattr(fast_path, "packed_attention_candidates",
                        lambda **kw: (["varlen", "sdpa"], []) if kw["packed"] else real_rule(**kw))
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: kernel)
    notes = []
    monkeypatch.setattr("peftctl.train.loop._sayer", lambda console, quiet: notes.append)
    recipe = write_recipe(tiny_model("llama"), dataset={"packing": True},
                          training={"max_steps": 2, "micro_batch_size": 2})
    result = train(load_recipe(str(recipe), []), TrainOptions(quiet=True))
    return json.loads((Path(result.run_dir) / "run.json").read_text()), notes, result


def test_a_kernel_that_fails_its_probe_falls_back_to_sdpa_and_the_run_trains(tiny_model, write_recipe,
                                                                              monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    manifest, notes, result = _fallback_run(tiny_model, write_recipe, monkeypatch, broken)
    assert result.steps == 2 and manifest["status"] == "completed"
    attention = manifest["fast_path"]["attention"]
    assert attention["kernel"] == "sdpa"
    why = "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    # a grouped-query model: the heads as they are first, then repeated, then SDPA
    assert attention["tried"] == [{"kernel": "varlen with grouped-query heads as they are", "refused": why},
                                  {"kernel": "varlen", "refused": why}]
    assert any(n.startswith("note: packed attention: varlen failed its probe") and "sdpa instead" in n
               for n in notes)


def test_a_kernel_that_passes_its_probe_is_chosen_and_trains_as_sdpa_does(tiny_model, write_recipe, monkeypatch):
    manifest, notes, result = _fallback_run(tiny_model, write_recipe, monkeypatch, reference_varlen)
    assert manifest["fast_path"]["attention"] == {"kernel": "varlen", "tried": []}
    assert not any("packed attention" in n for n in notes)
    assert result.steps == 2 and result.train_loss is not None


def test_the_cpu_keeps_sdpa(tiny_model, trained):
    run = trained("packed", tiny_model("llama"), dataset={"packing": True})
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["fast_path"]["attention"] == {"kernel": "sdpa", "tried": []}


def test_the_plan_predicts_the_kernel_and_its_smaller_attention_term(tiny_model, write_recipe, monkeypatch):
    import dataclasses

    from peftctl import plan
    from peftctl.params import count_for_recipe
    from peftctl.recipe.loader import load_recipe

    recipe = load_recipe(str(write_recipe(tiny_model("llama"), model={"dtype": "bfloat16"},
                                          dataset={"packing": True}))).recipe
    counted = count_for_recipe(recipe)
    shape = plan.model_shape(counted.model, counted.config, recipe)
    monkeypatch.setattr(fast_path, "torch_version", lambda: (2, 11))
    monkeypatch.setattr(fast_path, "varlen_repeats_kv", lambda: False)
    varlen = plan.setting_for(recipe, shape, False, fast_path=False)
    assert varlen.attention == "varlen"
    assert plan.setting_for(recipe, shape, False, fast_path=False, device="cpu").attention == "sdpa"
    unpacked = recipe.model_copy(update={"dataset": recipe.dataset.model_copy(update={"packing": False})})
    assert plan.setting_for(unpacked, shape, False, fast_path=False).attention == "sdpa"
    # varlen keeps what SDPA's flash kernel keeps without a mask (q, k, v unrepeated, out, lse): less than the
    # dense block mask and the repeated key/value heads
    term = lambda s: plan.activation_bytes(shape, s)["attention"]  # noqa: E731
    flash = dataclasses.replace(varlen, attention="sdpa", attention_mask=False)
    masked = dataclasses.replace(varlen, attention="sdpa", attention_mask=True)
    assert term(varlen) == term(flash) < term(masked)
    monkeypatch.setattr(fast_path, "varlen_repeats_kv", lambda: True)  # torch without enable_gqa
    assert term(flash) < term(varlen) < term(masked)


def test_the_lengths_reach_the_attention_through_peft(monkeypatch):
    """peft's forward passes the keyword arguments on: a packed loss through the varlen wrapper calls the kernel in
    every layer and equals the loss of the same examples one a row."""
    import functools

    from peft import LoraConfig, get_peft_model

    from peftctl.train.loss import loss_sum

    calls = []

    @functools.wraps(reference_varlen)  # the same signature, as the wrapper reads it
    def counting(*args, **kwargs):
        calls.append(1)
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: counting)
    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    packed_attention.set_attention(model, packed_attention.VARLEN)
    assert packed_attention.uses_documents(model)
    examples = [example(7), example(5, 40), example(9, 80)]
    with torch.no_grad():
        packed = collate([examples], pad_id=0, packed=True, pad_to=24)
        packed_loss = loss_sum(model, packed) / packed.n_trained
        assert len(calls) == 2  # both layers went through the kernel
        singles = [collate([[e]], pad_id=0, packed=False) for e in examples]
        unpacked_loss = sum(loss_sum(model, b) for b in singles) / sum(b.n_trained for b in singles)
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-5)


def test_the_key_value_heads_go_to_the_kernel_as_they_are_where_it_takes_them(monkeypatch):
    """torch 2.11's kernel has no enable_gqa but takes 2 key/value heads for 4 query heads: the probe passes them
    unrepeated (no repeated copies kept for the backward pass)."""
    monkeypatch.setattr(packed_attention, "varlen_kernel", lambda: reference_flash_211)
    monkeypatch.setattr(reference_flash_211, "kv_heads_seen", [])
    shape = {"heads": 4, "kv_heads": 2, "head_dim": 16, "rows": 2, "length": 40}
    assert packed_attention.probe("varlen", shape, torch.device("cpu"), torch.float32) is None
    assert set(reference_flash_211.kv_heads_seen) == {2}
    assert packed_attention.probe("varlen", shape, torch.device("cpu"), torch.float32, repeat_kv=True) is None
    assert reference_flash_211.kv_heads_seen[-1] == 4


def test_a_kernel_that_refuses_fewer_key_value_heads_gets_them_repeated(tiny_model, write_recipe, monkeypatch):
    """The probe tries the key/value heads as they are first; a kernel that refuses them gets them repeated, and
    run.json says which form was refused and why."""
    model_dir = tiny_model("llama")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # a grouped-query model
    manifest, notes, result = _fallback_run(tiny_model, write_recipe, monkeypatch, reference_without_gqa)
    attention = manifest["fast_path"]["attention"]
    assert attention["kernel"] == "varlen" and result.steps == 2
    assert [t["kernel"] for t in attention["tried"]] == ["varlen with grouped-query heads as they are"]
    assert "AssertionError" in attention["tried"][0]["refused"]


def test_rows_of_one_example_each_skip_the_probe_and_the_isolation_check(tiny_model, write_recipe, monkeypatch,
                                                                          tmp_path):
    """Packing on, but every example longer than half a row: no row holds two, so nothing can leak and the run
    spends no time probing kernels or checking isolation (the benchmark's full-length cases)."""
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"repeat {i} " + "the cat sat on the mat " * 6, "input": "",
                                        "output": "the cat sat on the mat " * 6}) + "\n" for i in range(8)))
    real_rule = fast_path.packed_attention_candidates
    monkeypatch.setattr(fast_path, "packed_attention_candidates",
                        lambda **kw: (["varlen", "sdpa"], []) if kw["packed"] else real_rule(**kw))

    def refuse(*args, **kwargs):
        raise AssertionError("not to be called for rows of one example")

    monkeypatch.setattr(packed_attention, "probe", refuse)
    monkeypatch.setattr("peftctl.model.check_packing_isolation", refuse)
    recipe = write_recipe(tiny_model("llama"), data=data, dataset={"packing": True, "max_length": 96},
                          training={"max_steps": 2, "micro_batch_size": 2})
    loaded = load_recipe(str(recipe), [])
    result = train(loaded, TrainOptions(quiet=True))
    manifest = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert result.steps == 2 and manifest["fast_path"]["attention"]["kernel"] == "sdpa"

    from peftctl.data.prepare import prepare
    from peftctl.model import load_tokenizer

    tokenizer = load_tokenizer(loaded.recipe.model)
    prepared = prepare(loaded.recipe.dataset, tokenizer, seed=0, pad_id=tokenizer.pad_token_id)
    assert prepared.packed and all(len(row) == 1 for row in prepared.train.rows)  # the case this test means
    assert not prepared.shares_rows
    short = prepare(loaded.recipe.dataset.model_copy(update={"max_length": 1024}), tokenizer, seed=0,
                    pad_id=tokenizer.pad_token_id)
    assert short.shares_rows  # the same examples in longer rows do share them
