"""The benchmark harness of BENCHMARKS.md (scripts/bench.py, bench_reference.py, bench_gates.py), on the CPU.

The fast tests check its pieces: FLOP counts of the Llama-3-8B shape, the case data, the recipes peftctl gets (valid,
and nothing a user would not write), the word-level tokenizer (N words are N tokens), the reference's collator, the
statistics and the gate verdicts. The slow ones run the whole harness with --tiny, each side in its own process.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import yaml

import bench  # scripts/ is on sys.path (conftest)
import bench_gates
from bench_reference import PadToLongest
from conftest import REPO


def test_flops_of_the_llama3_8b_shape():
    config = bench.LLAMA3_8B.config
    model = bench.flop_model(config, bench.QKVO, r=16)
    assert model["parameters"] == 8_030_261_248  # Meta-Llama-3-8B
    # The input embedding is a lookup and norms are elementwise: neither counts as matmul work.
    assert model["parameters_counted"] == 8_030_261_248 - 128256 * 4096 - 32 * 2 * 4096 - 4096
    assert model["matmul"] == 4 * model["parameters_counted"]
    assert model["lora"] == 32 * 6 * 16 * ((4096 + 4096) + (4096 + 1024) * 2 + (4096 + 4096))
    all_linear = bench.flop_model(config, "all-linear", r=16)["lora"]
    assert all_linear == model["lora"] + 32 * 6 * 16 * 3 * (4096 + 14336)
    per_token = bench.flops_per_token(model, [2048] * 4)
    assert per_token == model["matmul"] + model["lora"] + 6 * 32 * 4096 * 2048
    assert 31e9 < per_token < 32.5e9
    # Mixed lengths: attention weighs each token by its own example's length.
    assert bench.flops_per_token(model, [100, 300]) == pytest.approx(
        model["matmul"] + model["lora"] + 6 * 32 * 4096 * (100 * 100 + 300 * 300) / 400)


def test_case_data():
    fixed = bench.example_lengths(bench.CASES[1], bench.LLAMA3_8B, steps=11)
    assert fixed == [2048] * 44
    assert bench.example_lengths(bench.CASES[4], bench.LLAMA3_8B, steps=11) == [2048] * 11
    sft = bench.example_lengths(bench.CASES[2], bench.LLAMA3_8B, steps=11)
    assert sft == bench.example_lengths(bench.CASES[2], bench.LLAMA3_8B, steps=11)  # deterministic
    assert 280 <= statistics.median(sft) <= 390 and max(sft) <= 2048 and min(sft) >= 8
    assert sum(sft) >= 44 * 2048  # enough to fill peftctl's packed rows for every step


def test_dataset_rows_are_words(tmp_path):
    path = tmp_path / "data.jsonl"
    bench.write_dataset(path, [5, 1, 30], vocab_size=1024, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["text"].split()) for r in rows] == [4, 0, 29]  # the EOS each side appends makes the length
    assert all(w.startswith("w") and int(w[1:]) < 1024 - bench.N_SPECIAL for r in rows for w in r["text"].split())


@pytest.mark.parametrize("number", sorted(bench.CASES))
def test_recipes_are_plain_user_recipes(tmp_path, number):
    from peftctl.recipe.loader import parse_recipe

    case = bench.CASES[number]
    recipe = bench.peftctl_recipe(case, bench.LLAMA3_8B, "/models/llama", tmp_path / "d.jsonl", tmp_path / "run", 11)
    loaded = parse_recipe(yaml.safe_dump(recipe), "bench.yaml", tmp_path, check_paths=False).recipe
    assert loaded.training.micro_batch_size == case.rows_per_step and loaded.training.gradient_accumulation == 1
    assert loaded.dataset.packing == "auto" and loaded.dataset.format == "completion"  # a user's default: packs
    assert loaded.method.r == 16 and loaded.method.alpha == 32 and loaded.method.dropout == 0.05
    assert loaded.training.learning_rate == 2e-4 and loaded.training.weight_decay == 0.0
    assert loaded.training.lr_scheduler == "constant"
    if number == 4:
        assert loaded.training.gradient_checkpointing is True  # the case's definition
    else:
        assert loaded.training.gradient_checkpointing == "auto"  # a user's default
    if case.quantized:
        q = loaded.quantization
        assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (4, "nf4", True, "bfloat16")
    known = {"max_steps", "micro_batch_size", "gradient_accumulation", "learning_rate", "lr_scheduler",
             "warmup_steps", "save_every", "seed", "gradient_checkpointing"}
    assert set(recipe["training"]) <= known


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    from transformers import AutoTokenizer

    bench.write_tokenizer(tmp_path, vocab_size=1024, model_max_length=512)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 1024
    assert tokenizer("w0 w5 w767")["input_ids"] == [0, 5, 767]  # no BOS added
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 768)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_text|>", 769)
    assert tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>") == 772
    assert len(bench.llama3_special_tokens()) == bench.N_SPECIAL == len(set(bench.llama3_special_tokens()))


def test_reference_collator_pads_to_the_longest():
    collator = PadToLongest(pad_id=9)
    batch = collator([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 9]}])  # 9: an EOS that is also the pad
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 9, -100]]  # the real EOS is trained, the padding is not
    assert (collator.real_tokens, collator.padded_tokens) == ([5], [6])


def test_summaries():
    steps = [{"tokens": 100, "seconds": 10.0}] + [{"tokens": t, "seconds": 1.0} for t in (100, 300, 200)]
    fixed = bench.summarise(steps, warmup=1, variable=False)
    assert fixed["tokens_per_s"] == 200 and fixed["statistic"] == "median" and fixed["window_tokens"] == 600
    window = bench.summarise(steps[:3] + [{"tokens": 200, "seconds": 2.0}], warmup=1, variable=True)
    assert window["tokens_per_s"] == pytest.approx(600 / 4) and window["statistic"] == "window"
    assert "error" in bench.summarise(steps[:1], warmup=1, variable=False)
    # the last step's line follows the one before it by less than a step (it was not launched ahead): left out
    last = {"tokens": 10, "seconds": 1.0, "arrival_s": 0.3}
    agree = bench._agreement([{"tokens": 10, "seconds": 1.0, "arrival_s": 1.0}] * 3 + [last], warmup=1)
    assert agree["timer_agrees"]
    late = [{"tokens": 10, "seconds": 0.5, "arrival_s": 1.0}] * 4  # a timer read before the GPU has finished
    assert not bench._agreement(late, warmup=1)["timer_agrees"]
    summary = bench.peftctl_summary(late, warmup=1, variable=False)
    assert summary["tokens_per_s"] == 10 and summary["timer_tokens_per_s"] == 20
    assert summary["source"].startswith("arrival")
    agreeing = [{"tokens": 10, "seconds": 1.0, "arrival_s": 1.01}] * 4
    assert bench.peftctl_summary(agreeing, warmup=1, variable=False)["source"] == "step timer"


def test_startup_medians_and_verdict():
    """Launch to first step compared by each side's median launch; a launch that never reached a step is left out,
    and a side with none gives no verdict."""
    summary = bench.startup_summary({"peftctl": [30.0, 21.0, 22.0], "reference": [20.0, 25.0, None, 24.0]})
    assert summary["median"] == {"peftctl": 22.0, "reference": 24.0} and summary["met"] is True
    assert bench.startup_summary({"peftctl": [26.0], "reference": [25.0]})["met"] is False
    assert bench.startup_summary({"peftctl": [None], "reference": [25.0]})["met"] is None
    report = {"cases": {"1": {"sides": {}, "startup": summary}}}
    assert bench.setup_lines(report) == ["case 1 launch to first step (s), median of each side's launches: "
                                         "reference 24.0 (20.0, 25.0, -, 24.0), peftctl 22.0 (30.0, 21.0, 22.0): met"]


def test_setup_lines_give_each_sides_phases_and_first_step():
    report = {"cases": {"3": {"sides": {
        "peftctl": {"setup_phases": {"imports": 3.6, "tokenizer": 10.2}, "first_step_s": 2.7,
                    "first_step_from_launch_s": 16.5, "triton_compiled": 8},
        "reference": {"setup_phases": {"launch": 0.5, "imports": 9.0, "model_load": 6.0}, "first_step_s": 2.1,
                      "first_step_from_launch_s": 17.6}}}}}
    assert bench.setup_lines(report) == [
        "case 3 peftctl setup (s): imports 3.6, tokenizer 10.2, first step 2.7; sum 16.5, launch to first step 16.5 "
        "(a cold Triton cache: 8 entries compiled in this launch)",
        "case 3 reference setup (s): launch 0.5, imports 9.0, model_load 6.0, first step 2.1; sum 17.6, launch to "
        "first step 17.6"]


def test_triton_cache_entries_count_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert bench.triton_cache_entries() == 0  # no cache yet
    for name in ("KERNELHASH1", "KERNELHASH2"):
        (tmp_path / "cache" / name).mkdir(parents=True)
    assert bench.triton_cache_entries() == 2
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))  # Triton's cache then under $TRITON_HOME/.triton
    (tmp_path / "home" / ".triton" / "cache" / "KERNELHASH3").mkdir(parents=True)
    assert bench.triton_cache_entries() == 1


def test_gate_verdicts():
    spec = {"rtol": 1e-3}
    pf = {"loss_packed": 10.0, "loss_unpacked": 10.001, "loss_leaky": 10.5, "grad_norm": 0.3, "params_with_grad": 8,
          "trainable_tensors": 8, "rows_packed": 1}
    ref = {"loss": 10.002, "grad_norm": 0.2, "params_with_grad": 8, "trainable_tensors": 8}
    examples = [{"input_ids": [3, 4, 769]}]
    gates = bench_gates.evaluate(spec, pf, ref, examples, examples, [2])
    assert [g["passed"] for g in gates] == [True, True, True, True] and not gates[3]["weak"]

    bad = bench_gates.evaluate(spec, {**pf, "loss_unpacked": 10.5, "loss_leaky": 10.0001, "grad_norm": 0.0},
                               {**ref, "loss": 11.0}, examples, [{"input_ids": [3, 5, 769]}], [2])
    assert [g["passed"] for g in bad] == [False, False, False, False] and bad[3]["weak"]


def _run_bench(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=900,
                          cwd=str(REPO), check=False)
    report = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
    return proc, report, out


def _side(report, case, name):
    return report["cases"][str(case)]["sides"][name]


@pytest.mark.slow
def test_tiny_bench_case_1_end_to_end(tmp_path):
    # 3 timed steps: the timer check compares the timed steps but the last, and needs two
    proc, report, out = _run_bench(tmp_path, "--cases", "1", "--startup-repeats", "1", "--steps", "3")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    startup = report["cases"]["1"]["startup"]  # the throughput launches, then one more each, reference first
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in startup["seconds"].values())
    assert startup["met"] in (True, False) and "launch to first step (s), median" in (out / "bench.md").read_text()
    assert (out / "runs" / "case1-startup1-peftctl" / "run.json").exists()
    gates = report["gates"]["gates"]
    assert [g["name"] for g in gates] == ["same tokens", "step-0 loss", "gradient", "packed = unpacked"]
    assert all(g["passed"] for g in gates), gates
    assert report["matmul"]["flops"] > 0
    for name in ("peftctl", "reference"):
        side = _side(report, 1, name)
        assert side["status"] == "completed"
        assert [s["tokens"] for s in side["steps"]] == [4 * 128] * 4  # 1 warm-up + 3 timed, 4 x 128 real tokens
        assert side["summary"]["tokens_per_s"] > 0 and side["summary"]["timed_steps"] == 3
        assert side["mfu"] > 0 and side["first_step_s"] > 0 and side["first_step_from_launch_s"] > 0
        assert side["first_grad_norm"] > 0
    # The timer check ran on the timed steps but the last (its verdict on 20 ms CPU steps, where writing a line is a
    # few percent, is the machine's; test_summaries checks the verdict itself), and its verdict chose the source.
    summary = _side(report, 1, "peftctl")["summary"]
    assert summary["arrival_tokens_per_s"] > 0
    assert summary["source"] == ("step timer" if summary["timer_agrees"] else "arrival times of the step lines")
    assert _side(report, 1, "peftctl")["packed"] is True
    # The reference's launch, phase by phase like peftctl's: the phases and the first step make up the whole launch
    reference = _side(report, 1, "reference")
    assert list(reference["setup_phases"]) == ["launch", "imports", "tokenizer", "data", "model_load", "trainer",
                                               "train_begin"]
    accounted = sum(reference["setup_phases"].values()) + reference["first_step_s"]
    assert accounted == pytest.approx(reference["first_step_from_launch_s"], abs=0.5)
    assert "case 1 reference setup (s): launch" in (out / "bench.md").read_text()
    assert report["cases"]["1"]["verdict"]["ratio"] > 0
    table = (out / "bench.md").read_text()
    assert "| 1 | bf16 LoRA q,k,v,o" in table and "PASS step-0 loss" in table
    assert "PASS  packed = unpacked" in proc.stdout
    assert (out / "runs" / "case1-peftctl" / "run.json").exists()


@pytest.mark.slow
def test_tiny_bench_4bit_gates_and_sft_window(tmp_path):
    """Gates as case 3 (4-bit on the CPU through bitsandbytes), then case 2: the reference's measured window holds
    about as many real tokens as peftctl's."""
    proc, report, _ = _run_bench(tmp_path, "--cases", "3,2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["gates"]["as_case"] == 3 and all(g["passed"] for g in report["gates"]["gates"])
    pf, ref = _side(report, 2, "peftctl"), _side(report, 2, "reference")
    assert pf["summary"]["statistic"] == ref["summary"]["statistic"] == "window"
    assert ref["summary"]["window_tokens"] >= pf["summary"]["window_tokens"]
    assert ref["summary"]["window_tokens"] <= pf["summary"]["window_tokens"] + 8 * 128
    assert all(s["tokens"] < s["padded_tokens"] or s["tokens"] == s["padded_tokens"] for s in ref["steps"])
    assert _side(report, 3, "peftctl")["status"] == _side(report, 3, "reference")["status"] == "completed"


def test_lora_branch_benchmark_runs_both_paths_and_takes_the_fused_one(monkeypatch, capsys):
    """scripts/bench_lora_branch.py on the CPU, shrunk: every layer row shows the fused branch taken on every timed
    call and the same gradients as peft's forward."""
    import bench_lora_branch
    from peftctl.train import fused_lora

    repeats = 1
    from peftctl import fast_path

    # main() wraps lora_branch and the kernel's apply to count their calls and sets the kernel's devices, and never
    # puts them back (a script's process ends): put them back after
    monkeypatch.setattr(fused_lora, "lora_branch", fused_lora.lora_branch)
    monkeypatch.setattr(fused_lora._KernelDropout, "forward", fused_lora._KernelDropout.forward)
    monkeypatch.setattr(fast_path, "LORA_DROPOUT_KERNEL_DEVICES", fast_path.LORA_DROPOUT_KERNEL_DEVICES)
    monkeypatch.setattr(sys, "argv", ["bench_lora_branch.py", "--device", "cpu", "--quant", "none", "--shrink", "64",
                                      "--tokens", "16", "--repeats", str(repeats)])
    bench_lora_branch.main()
    stdout = capsys.readouterr().out
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0].endswith("proj")]
    assert [r[0] for r in rows] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the kernel column runs in Triton's interpreter
    for row in rows:
        out_diff, grad_x_diff, grad_a_diff, calls = float(row[6]), float(row[8]), float(row[10]), int(row[11])
        assert calls == repeats + 3  # warm-up calls included
        assert out_diff < 2e-2 and grad_x_diff < 2e-2 and grad_a_diff < 2e-2, row  # bf16 rounding at most
        if interpreted:  # (the script itself fails unless the kernel ran on every timed call)
            dropped, kernel_out, kernel_grad_a = float(row[12]), float(row[14]), float(row[16])
            assert 0 < dropped < 0.15 and kernel_out < 3e-2 and kernel_grad_a < 3e-2, row  # p = 0.05
    assert "layer sum" in stdout
    kept = re.search(r"fused ([\d.]+) MiB, kernel ([\d.]+) MiB", stdout)
    assert not interpreted or float(kept[2]) < float(kept[1])


@pytest.mark.slow
def test_merge_benchmark_runs_every_side_on_the_cpu(tmp_path):
    """scripts/bench_merge.py shrunk on the CPU: plain peft and peftctl's LoRA and QLoRA merges all complete, the
    peftctl ones verified (within their tolerance), with times and host peaks in the report."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_merge.py"), "--shrink", "64", "--device",
                           "cpu", "--out", str(tmp_path)], capture_output=True, text=True, cwd=str(REPO), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench_merge.json").read_text())
    assert list(report["sides"]) == ["plain peft", "peftctl LoRA", "peftctl QLoRA"]
    for name, side in report["sides"].items():
        assert side["status"] == "completed" and side["seconds"] > 0 and side["host_peak_bytes"] > 0, name
        assert side["output_bytes"] > 0.9 * report["base_bytes"], name  # a whole bf16 model was written
    for name in ("peftctl LoRA", "peftctl QLoRA"):
        check = report["sides"][name]["verification"]
        assert check["relative_diff"] <= check["tolerance"] and check["base_relative_diff"] > 1e-4, name
    assert "| peftctl QLoRA |" in (tmp_path / "bench_merge.md").read_text()


@pytest.mark.slow
def test_regional_compile_benchmark_compiles_the_same_decoder(monkeypatch, tmp_path):
    """scripts/bench_compile.py on the CPU, tiny: the compiled decoder computes what the eager one does (dropout
    off), the fused LoRA branch routed on every q,k,v,o layer, and both timings reported (about a minute: the
    compile)."""
    import bench_compile

    out = tmp_path / "compile.json"
    monkeypatch.setattr(sys, "argv", ["bench_compile.py", "--device", "cpu", "--tiny", "--layers", "2", "--rows", "2",
                                      "--tokens", "16", "--repeats", "1", "--warmup", "1", "--json", str(out)])
    bench_compile.main()
    result = json.loads(out.read_text())
    assert result["fused_lora_layers"] == 2 * 4
    assert result["rel_diff_output"] < 1e-4 and result["rel_diff_adapter_grads"] < 1e-4
    assert result["eager_step_s"] > 0 and result["compiled_step_s"] > 0 and result["tokens"] == 32


def test_step_profile_measures_base_fused_and_peft_ways(monkeypatch, capsys):
    """scripts/profile_step.py on the CPU, tiny: the base, fused and peft steps are timed on models routed as each
    way says (the peft way has no layer on the fused forward), and the LoRA branch's cost is printed."""
    import types

    import torch

    import profile_step
    from peftctl.train.fused_lora import _fused_forward

    args = types.SimpleNamespace(tiny=True, layers=1, targets="qkvo", quant="none")
    fused, _, routed = profile_step.build(args, torch.device("cpu"), fused=True)
    plain, _, _ = profile_step.build(args, torch.device("cpu"), fused=False)
    on_fused = lambda m: sum(getattr(x.forward, "__func__", None) is _fused_forward for x in m.modules())  # noqa: E731
    assert on_fused(fused) == routed == 4 and on_fused(plain) == 0
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--device", "cpu", "--tiny", "--layers", "1", "--rows", "1",
                                      "--tokens", "8", "--repeats", "1"])
    profile_step.main()
    out = capsys.readouterr().out
    for way in ("base", "fused", "peft"):
        assert f"  {way} " in out
    assert "the LoRA branch: fused" in out


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run on the CPU in Triton's "
                    "interpreter only")
def test_dropout_kernel_tuning_tries_every_configuration_and_checks_it(monkeypatch, capsys):
    """scripts/tune_lora_dropout_kernel.py on the CPU, tiny: every configuration of the grid is timed for each
    kernel and gives the shipped tiles' results."""
    import tune_lora_dropout_kernel

    monkeypatch.setattr(sys, "argv", ["tune_lora_dropout_kernel.py", "--device", "cpu", "--tokens", "40",
                                      "--widths", "48", "--block-m", "16,32", "--block-k", "16", "--warps", "4",
                                      "--stages", "2", "--targets", "4,8", "--repeats", "1", "--top", "9"])
    tune_lora_dropout_kernel.main()
    out = capsys.readouterr().out
    assert "2 tile configurations x 2 split targets" in out
    for name, count in (("forward", 4), ("grad_x", 2), ("grad_a", 4)):  # grad_x splits nothing: one target
        assert f"{name}: best of {count}" in out
    rows = [line for line in out.splitlines() if "rel. diff" in line]
    assert len(rows) == 10 and all(float(r.rsplit(" ", 1)[1]) < 1e-2 for r in rows)
    assert sum("'BLOCK_M': 16" in r for r in rows) == sum("'BLOCK_M': 32" in r for r in rows) == 5
    assert "best of each:" in out
