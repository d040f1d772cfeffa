"""model.input_embeddings: the frozen input embedding in host memory (peftctl/host_embedding.py, the rule in
peftctl/placement.py). On this CPU-only machine the "device" is the CPU itself: the module's transfer (`send`) is
observed with a spy, and the outputs and gradients are compared with the model's own embedding bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftctl import placement
from peftctl.errors import InvalidInput, RecipeError
from peftctl.host_embedding import HostEmbedding, place_input_embeddings, why_not


def load(folder, *, checkpointing: bool = False, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftctl.model import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable_gradient_checkpointing(model)  # registers the require-grads hook on the embedding
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                                             init_lora_weights=False))
    model.train()
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture
def spy(monkeypatch):
    """The transfer, observed; and `cpu` honoured on this CPU-only machine (the rule leaves a CPU run alone)."""
    monkeypatch.setattr(placement, "on_host", lambda choice, **_: choice == "cpu")
    sent = []
    original = HostEmbedding.send

    def send(self, rows):
        sent.append(rows)
        return original(self, rows)

    monkeypatch.setattr(HostEmbedding, "send", send)
    return sent


def test_host_lookup_gives_the_same_logits_loss_and_gradients(tiny_model, spy):
    from peftctl.params import count_parameters

    model = load(tiny_model("llama"), checkpointing=True)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    before = loss_and_grads(model, ids)
    count_before = count_parameters(model)
    embedding = model.get_base_model().get_input_embeddings()
    table = embedding.weight.detach().clone()

    assert place_input_embeddings(model, "cpu", torch.device("cpu"), world_size=1, quantised=False,
                                  checkpointing=True, prompt_learning=False)
    host = model.get_base_model().get_input_embeddings()
    assert isinstance(host, HostEmbedding) and torch.equal(host.weight, table)
    # the table is no parameter of the model: not moved by .to(), not in state_dict or the optimiser
    assert all(p is not host.weight for p in model.parameters())
    assert not any("embed_tokens" in k for k in model.state_dict())
    assert count_parameters(model) == count_before  # still counted as part of the model

    after = loss_and_grads(model, ids)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    # the rows went through the transfer, looked up on the host: one micro-batch's rows, not the table
    assert len(spy) == 1 and spy[0].device.type == "cpu" and spy[0].shape == (2, 24, table.shape[1])
    assert torch.equal(spy[0], table[ids])


def test_the_require_grads_hook_moves_to_the_host_module(tiny_model, spy):
    """Checkpointed layers need their input to require a gradient; transformers' hook on the embedding must now
    act on the host module's output (on the GPU), not on rows left in host memory."""
    model = load(tiny_model("llama"), checkpointing=True)
    hooks = dict(model.get_base_model().get_input_embeddings()._forward_hooks)
    assert hooks  # transformers' (and peft's) make_inputs_require_grads
    place_input_embeddings(model, "cpu", torch.device("cpu"), world_size=1, quantised=False, checkpointing=True,
                           prompt_learning=False)
    host = model.get_base_model().get_input_embeddings()
    assert dict(host._forward_hooks) == hooks
    with torch.no_grad():  # the rows are looked up without a graph; the hook then marks what the layers read
        rows = host.table[torch.tensor([[3, 4, 5]])]
    out = host(torch.tensor([[3, 4, 5]]))
    assert out.requires_grad and torch.equal(out.detach(), rows)


def test_rule_for_auto_gpu_and_cpu():
    def on(choice, device="cuda", quantised=True, checkpointing=True, blocker=None):
        return placement.on_host(choice, device_type=device, quantised=quantised, checkpointing=checkpointing,
                                 blocker=blocker)

    assert on("auto") and on("cpu") and not on("gpu")
    assert not on("auto", quantised=False) and not on("auto", checkpointing=False)
    assert on("cpu", quantised=False, checkpointing=False)
    assert not on("auto", device="cpu") and not on("cpu", device="cpu")  # already in host memory
    assert not on("auto", blocker="tied") and not on("cpu", blocker="tied")
    assert placement.host_blocker(world_size=2, prompt_learning=False, embedding=None)
    assert placement.host_blocker(world_size=1, prompt_learning=True, embedding=None)
    assert placement.host_blocker(world_size=1, prompt_learning=False, embedding=None) is None


def test_explicit_cpu_that_cannot_be_honoured_is_bad_input(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, tie_word_embeddings=True)
    tied = AutoModelForCausalLM.from_config(config)
    assert "tied" in why_not(tied)
    cuda = torch.device("cuda")  # never touched: the refusal comes first
    with pytest.raises(InvalidInput) as err:
        place_input_embeddings(tied, "cpu", cuda, world_size=1, quantised=True, checkpointing=True,
                               prompt_learning=False, where="recipe.yaml:4:3")
    assert err.value.exit_code == 2 and str(err.value.message).startswith("recipe.yaml:4:3: model.input_embeddings")
    assert not place_input_embeddings(tied, "auto", cuda, world_size=1, quantised=True, checkpointing=True,
                                      prompt_learning=False)  # auto just keeps it
    untied = load(tiny_model("llama"))
    assert why_not(untied) is None
    with pytest.raises(InvalidInput, match="several processes"):
        place_input_embeddings(untied, "cpu", cuda, world_size=2, quantised=True, checkpointing=True,
                               prompt_learning=False)
    trained = load(tiny_model("llama"), targets=("q_proj", "embed_tokens"))  # LoRA on the embedding itself
    assert "not a plain lookup" in why_not(trained)


def test_recipe_key_is_validated_with_its_line():
    from peftctl.recipe.loader import parse_recipe

    base = ("model:\n  name: org/m\n  input_embeddings: {}\nmethod:\n  name: {}\ndataset:\n  path: org/d\n"
            "output:\n  dir: runs/x\n")
    assert parse_recipe(base.format("cpu", "qlora"), "r.yaml", Path.cwd()).recipe.model.input_embeddings == "cpu"
    assert parse_recipe(base.format("auto", "lora"), "r.yaml", Path.cwd()).recipe.model.input_embeddings == "auto"
    for value, method, words in (("host", "lora", "auto"), ("cpu", "prompt_tuning", "reads the embedding")):
        with pytest.raises(RecipeError) as err:
            parse_recipe(base.format(value, method), "r.yaml", Path.cwd())
        (problem,) = err.value.problems
        assert problem.key == "model.input_embeddings" and problem.location.line == 3 and words in str(problem)


def test_a_run_trained_this_way_saves_the_same_adapter_and_merges(tiny_model, tmp_path, spy):
    """The loop with the embedding in host memory (the CPU standing in for the GPU): the same losses step by step,
    the same adapter files and tensors as a run with it in place, and the adapter merges as any other."""
    import json

    import yaml
    from safetensors.torch import load_file

    from conftest import read_jsonl, recipe_dict
    from peftctl.merge import merge_adapter
    from peftctl.recipe.loader import load_recipe
    from peftctl.train.loop import TrainOptions, train

    model = tiny_model("llama")

    def run_with(placement_choice: str) -> Path:
        out = tmp_path / placement_choice
        recipe = recipe_dict(model, out=out, model={"name": str(model), "dtype": "float32",
                                                    "input_embeddings": placement_choice},
                             training={"gradient_checkpointing": True})
        path = tmp_path / f"{placement_choice}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        train(load_recipe(str(path), []), TrainOptions(quiet=True))
        return out

    reference = run_with("gpu")
    assert not spy
    run = run_with("cpu")

    assert spy  # every forward pass took the host lookup
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["fast_path"]["input_embeddings"] == "cpu" and manifest["status"] == "completed"
    # one process: the layers recompute through the reentrant checkpoint, whose first forward builds no graph; the
    # host module's output must still carry the gradient into the first layer
    assert manifest["fast_path"]["activation_checkpointing"] == "reentrant"
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    assert manifest["fast_path"]["activation_checkpointing_calls"] == {  # every layer call of every step took it
        "reentrant": manifest["steps_done"] * layers, "non_reentrant": 0}
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses == [r["loss"] for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r]
    names = sorted(p.name for p in (run / "adapter").iterdir())
    assert names == sorted(p.name for p in (reference / "adapter").iterdir())
    mine, theirs = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, reference))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any("embed" in k for k in mine)
    merge_adapter(run / "adapter", tmp_path / "merged", force=True, report=lambda _: None)
    assert (tmp_path / "merged" / "config.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_table_leaves_the_gpu_and_the_results_stay(tiny_model):
    """The real placement: the table in ordinary host memory (only the picked rows go through a pinned buffer), the
    same logits and gradients as the GPU-resident embedding, and the table's bytes gone from the GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, 200, (2, 24), device=device, generator=torch.Generator(device).manual_seed(1))
    before = loss_and_grads(model, ids)
    table_bytes = model.get_base_model().get_input_embeddings().weight.nbytes
    allocated = torch.cuda.memory_allocated(device)
    assert place_input_embeddings(model, "cpu", device, world_size=1, quantised=False, checkpointing=False,
                                  prompt_learning=False)
    host = model.get_base_model().get_input_embeddings()
    assert host.weight.device.type == "cpu" and not host.weight.is_pinned()
    assert allocated - torch.cuda.memory_allocated(device) >= table_bytes
    after = loss_and_grads(model, ids)
    assert torch.equal(before[0], after[0]) and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
