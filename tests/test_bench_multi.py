"""bench.py --gpus N (scripts/bench_multi.py, issues 20 and 22) on the CPU.

The fast tests check its pieces: the 70B shape and --layers, the recipes at 1 and N GPUs, the verdict (scaling,
per-GPU peak, plan error) and the table. The slow one runs the harness with --tiny --gpus 2 over gloo: peftctl at 1
and 2 processes, the HF Trainer alone and under torchrun, and the SIGTERM / --resume auto case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

import bench  # scripts/ is on sys.path (conftest)
import bench_multi
from conftest import REPO

GiB = 1 << 30


def test_the_70b_shape_and_cutting_layers():
    full = bench.flop_model(bench_multi.LLAMA3_70B.config, bench.QKVO, r=16)
    assert full["parameters"] == 70_553_706_496  # Meta-Llama-3-70B
    args = bench_multi.parse_args(["--gpus", "4", "--shape", "70b"])
    assert args.layers == 20  # the default cut: build, save and load within one command
    cut = bench_multi.make_shape("70b", args.layers)
    assert cut.config["num_hidden_layers"] == 20 and "20 of 80 layers" in cut.name
    assert bench_multi.LLAMA3_70B.config["num_hidden_layers"] == 80  # the original is left alone
    assert bench_multi.make_shape("8b", None) is bench.LLAMA3_8B


@pytest.mark.parametrize("argv", [["--gpus", "1"], ["--gpus", "2", "--cases", "nope"], ["--gpus", "2", "--layers",
                                                                                           "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)  # bench.py hands --gpus to bench_multi
    assert e.value.code == 2 and "bench.py --gpus N" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ddp", "qlora-ddp", "fsdp"])
def test_recipes_at_one_and_n_gpus(tmp_path, name):
    from peftctl.recipe.loader import parse_recipe

    case = bench_multi.MULTI_CASES[name]
    ctx = bench.Context(Namespace(rows_per_gpu=2, gpus=2), bench.LLAMA3_8B, tmp_path, tmp_path, tmp_path,
                        model_dir="/models/llama")
    one = bench_multi.recipe_for(ctx, case, tmp_path / "d.jsonl", tmp_path / "a", 11, gpus=1)
    many = bench_multi.recipe_for(ctx, case, tmp_path / "d.jsonl", tmp_path / "b", 11, gpus=2)
    # one GPU: the BENCHMARKS.md recipe for the case, untouched
    assert one == bench.peftctl_recipe(case.base, bench.LLAMA3_8B, "/models/llama", tmp_path / "d.jsonl",
                                       tmp_path / "a", 11)
    loaded = parse_recipe(yaml.safe_dump(many), "b.yaml", tmp_path, check_paths=False).recipe
    assert loaded.training.distributed == case.engine and loaded.training.micro_batch_size == 2
    assert many["method"] == one["method"] and many.get("quantization") == one.get("quantization")


def _run(gpus, rate, peaks, plan=None, side="peftctl", status="completed"):
    return {"side": side, "gpus": gpus, "status": status, "summary": {"tokens_per_s": rate}, "rows_per_gpu": 4,
            "memory_per_rank": [{"rank": i, "loop_peak_memory_bytes": p, **({"plan_error": plan / p - 1} if plan
                                                                            else {})}
                                for i, p in enumerate(peaks)], "plan": {"peak_bytes": plan} if plan else None}


def _ctx(tmp_path, gpus=2):
    return bench.Context(Namespace(gpus=gpus), bench.LLAMA3_8B, tmp_path, tmp_path, tmp_path)


def test_scaling_verdict_and_table(tmp_path):
    case = bench_multi.MULTI_CASES["fsdp"]
    entry = {"runs": {
        "fsdp-peftctl-1gpu": _run(1, 10_000, [50 * GiB], plan=52 * GiB),
        "fsdp-peftctl-2gpu": _run(2, 15_000, [40 * GiB, 41 * GiB], plan=30 * GiB),
    }}
    v = bench_multi.scaling_verdict(_ctx(tmp_path), case, entry)
    assert v["scaling"]["peftctl"] == pytest.approx(1.5) and v["scaling_met"] is False
    assert v["peak_fraction"] == pytest.approx(41 / 50) and v["peak_fraction_met"] is False  # the larger rank
    flags = " ".join(v["flags"])
    assert "1.50x at 2 GPUs (target 1.6x)" in flags and "0.82x one GPU's" in flags
    assert "fsdp-peftctl-2gpu rank 1: the plan is -27% off" in flags
    assert "fsdp-peftctl-1gpu" not in flags  # +4%: within 15%
    entry.update(verdict=v)
    table = bench_multi.markdown({"started_at": "now", "gpus": 2, "shape": "8b", "cases": {"fsdp": entry}})
    assert "| fsdp | fsdp-peftctl-2gpu | 2 | 4 | 15,000 | 1.50x | - | 40.00, 41.00 | 30.00 | -25%, -27% |" in table


def test_ddp_verdict_compares_the_reference_at_both_sizes(tmp_path):
    case = bench_multi.MULTI_CASES["ddp"]
    entry = {"runs": {
        "ddp-peftctl-1gpu": _run(1, 16_000, [50 * GiB]), "ddp-peftctl-2gpu": _run(2, 31_000, [50 * GiB] * 2),
        "ddp-reference-1gpu": _run(1, 9_000, [29 * GiB], side="reference"),
        "ddp-reference-2gpu": _run(2, 17_000, [29 * GiB] * 2, side="reference", status="exit 1"),
    }}
    v = bench_multi.scaling_verdict(_ctx(tmp_path), case, entry)
    assert v["scaling_met"] is True and v["scaling"]["reference"] == pytest.approx(17 / 9)
    assert v["vs_reference"] == {"1": pytest.approx(16 / 9), "2": pytest.approx(31 / 17)}
    assert v["flags"] == ["ddp-reference-2gpu: exit 1"]


@pytest.mark.slow
def test_tiny_two_process_bench_end_to_end(tmp_path):
    """Both sides at 1 and 2 processes (gloo), and SIGTERM to the launcher then --resume auto: the report's
    fields, every rank's memory record, all ranks' tokens in a step, and resumed losses equal to the
    uninterrupted run's."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--gpus", "2", "--tiny", "--cases",
                           "ddp,resume", "--steps", "5", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=str(REPO), check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["gpus"] == 2 and report["matmul"]["flops"] > 0
    runs = report["cases"]["ddp"]["runs"]
    assert set(runs) == {f"ddp-{side}-{n}gpu" for side in ("peftctl", "reference") for n in (1, 2)}
    for label, run in runs.items():
        n = run["gpus"]
        assert run["status"] == "completed", label
        assert [s["tokens"] for s in run["steps"]] == [n * 4 * 128] * 6, label  # every rank's rows in a step
        assert [r["rank"] for r in run["memory_per_rank"]] == list(range(n)), label
        assert run["summary"]["tokens_per_s"] > 0 and run["mfu"] > 0
    assert runs["ddp-peftctl-2gpu"]["distributed"] == "ddp" and runs["ddp-reference-2gpu"]["world_size"] == 2
    assert runs["ddp-peftctl-2gpu"]["plan"]["description"].endswith("DDP over 2 GPUs (per GPU)")
    verdict = report["cases"]["ddp"]["verdict"]
    assert set(verdict["scaling"]) == {"peftctl", "reference"} and set(verdict["vs_reference"]) == {"1", "2"}

    resume = report["cases"]["resume"]["verdict"]
    assert resume["stopped_exit_code"] == 143 and resume["stopped_status"] == "stopped"
    assert resume["resumed_exit_code"] == 0 and resume["flags"] == []
    assert resume["resumed_steps"] == list(range(resume["stopped_at_step"] + 1, 7))
    assert resume["max_abs_loss_diff"] < 1e-4  # float32 on the CPU, the random streams restored: the same run
    table = (out / "bench.md").read_text()
    assert "| ddp | ddp-reference-2gpu | 2 | 4 |" in table and "--resume auto -> exit 0" in table
    assert Path(out / "runs" / "ddp-peftctl-2gpu" / "run.json").exists()


@pytest.mark.gpu
def test_two_gpu_bench_records_every_ranks_peak_beside_the_plan(tmp_path):
    """On a machine of 2+ GPUs (`python -m pytest -m gpu tests/test_bench_multi.py`): the harness end to end on the
    tiny shape, DDP and FSDP2, both sides; every rank's peak is measured and planned."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--gpus", "2", "--tiny", "--cases",
                           "ddp,fsdp", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    for name in ("ddp", "fsdp"):
        runs = report["cases"][name]["runs"]
        many = runs[f"{name}-peftctl-2gpu"]
        assert many["distributed"] == name
        assert all(r["loop_peak_memory_bytes"] > 0 and r["plan_error"] is not None for r in many["memory_per_rank"])
        assert len(many["memory_per_rank"]) == 2
    reference = report["cases"]["ddp"]["runs"]["ddp-reference-2gpu"]
    assert [r["peak_memory_bytes"] > 0 for r in reference["memory_per_rank"]] == [True, True]
