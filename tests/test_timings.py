"""run.json's timings.setup_phases (peftctl/train/timings.py): where the time before the first step goes, phase by
phase, and how scripts/bench.py prints it."""

from __future__ import annotations

import json
import time

import pytest

SETUP_ORDER = ["launch", "imports", "run_folder", "tokenizer", "data", "memory_plan", "model_load", "packing_check",
               "kernels", "attach", "loss_and_wrap", "optimizer", "run_files"]


def test_clock_gives_each_phase_the_time_since_the_last_mark(monkeypatch):
    from peftctl.train import timings

    now = iter([100.0, 101.5, 104.0, 104.5])
    monkeypatch.setattr(timings.time, "time", lambda: next(now))
    monkeypatch.setattr(timings, "process_start_time", lambda: 99.0)
    clock = timings.SetupClock()  # at 100.0, one second after the process started
    clock.mark("data")
    clock.mark("model_load")
    clock.mark("data")  # prepared again (unpacked after the packing check): the phase adds up
    assert clock.as_dict() == {"launch": 1.0, "data": 2.0, "model_load": 2.5}


def test_process_start_time_is_this_process():
    from peftctl.train.timings import process_start_time

    started = process_start_time()
    if started is None:
        pytest.skip("no /proc here")
    assert time.time() - 24 * 3600 < started <= time.time()


def test_a_run_records_its_setup_phases_in_order(tiny_model, trained):
    run = trained("timings", tiny_model("llama"))
    timings = json.loads((run / "run.json").read_text())["timings"]
    phases = timings["setup_phases"]
    assert list(phases) == [name for name in SETUP_ORDER if name in phases]
    assert {"imports", "tokenizer", "data", "model_load", "attach", "optimizer"} <= phases.keys()
    assert all(seconds >= 0 for seconds in phases.values())
    # what follows the imports is the setup that setup_s measures (t_start is taken after the imports)
    after_imports = sum(s for name, s in phases.items() if name not in ("launch", "imports"))
    assert after_imports == pytest.approx(timings["setup_s"], abs=0.1)


def test_bench_prints_the_breakdown_beside_the_first_step():
    import bench  # scripts/ is on sys.path (conftest)

    report = {"cases": {"4": {"sides": {"peftctl": {
        "setup_phases": {"launch": 2.0, "imports": 6.0, "model_load": 12.5}, "first_step_s": 1.5,
        "first_step_from_launch_s": 22.4}}}}}
    (line,) = bench.setup_lines(report)
    assert line == ("case 4 peftctl setup (s): launch 2.0, imports 6.0, model_load 12.5, first step 1.5; sum 22.0, "
                    "launch to first step 22.4")
    assert bench.setup_lines({"cases": {"1": {"sides": {"peftctl": {"setup_phases": None}}}}}) == []
