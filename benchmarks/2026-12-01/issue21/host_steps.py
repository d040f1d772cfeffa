"""Where the host's time goes inside real `peftctl train` steps of a host-bound case (case 4: QLoRA all-linear,
1 x 2048, checkpointing), and what Python's garbage collector costs there.

1. `peftctl train` on bench.py's case recipe in a fresh process, steps 5-8 under cProfile with autograd's device
   thread off (so the backward's Python runs on the profiled thread): OUT/host-steps-caseN.txt.
2. The same recipe, 24 steps, in turns with the collector as it is and switched off for the whole process
   (gc.disable(), the bound on what tuning it can give): the median step time of steps 5-23 from the step lines.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/host_steps.py OUT 4 [ROUNDS] [--no-profile]
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.argv[1] == "--child":  # one run: --child MODE RECIPE [PROFILE_OUT]
    mode, recipe, profile_out = sys.argv[2], sys.argv[3], (sys.argv[4:] or [None])[0]
    import gc
    import time
    if mode == "nogc":
        gc.disable()
    import torch
    import peftctl.train.loop as loop
    if mode == "profile":
        import cProfile
        import io
        import pstats
        torch.autograd.set_multithreading_enabled(False)
        profile, original, n = cProfile.Profile(), loop.forward_backward, [0]
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def wrapped(run, batches, after=None):
            n[0] += 1
            if n[0] == 5:
                sync()
                wrapped.t = time.perf_counter()
                profile.enable()
            if n[0] == 9:
                sync()
                profile.disable()
                wrapped.t = time.perf_counter() - wrapped.t
            return original(run, batches, after)
        loop.forward_backward = wrapped
    from peftctl.cli.app import main
    sys.argv = ["peftctl", "train", recipe, "--quiet", "--log-format", "json", "--force"]
    try:
        main()
    except SystemExit:
        pass
    if mode == "profile" and n[0] >= 9:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        print(f"4 steps under cProfile: {wrapped.t:.3f} s", file=text)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(60)
        Path(profile_out).write_text(text.getvalue())
    sys.exit(0)

sys.path.insert(0, "scripts")
import bench  # noqa: E402

out, case_no = Path(sys.argv[1]), int(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 2
work = Path(tempfile.mkdtemp(dir="/tmp"))
shape = bench.TINY if "--tiny" in sys.argv else bench.LLAMA3_8B
prep = bench.worker_prepare(work, shape)
print("prepared", prep["total_s"], flush=True)
case = bench.CASES[case_no]
data = work / f"case{case_no}.jsonl"
bench.write_dataset(data, bench.example_lengths(case, shape, 24, median=bench.SFT_MEDIAN, sigma=bench.SFT_SIGMA),
                    shape.config["vocab_size"], 42)
recipe = work / f"case{case_no}.yaml"


def run(mode, steps, *extra):
    bench.write_recipe(recipe, bench.peftctl_recipe(case, shape, prep["model_dir"], data, work / "runs" / mode, steps),
                       f"case {case_no}")
    p = subprocess.run([sys.executable, __file__, "--child", mode, str(recipe), *extra], capture_output=True, text=True)
    steps = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"type": "step"')]
    if p.returncode or not steps:
        print(mode, "failed", p.returncode, p.stderr[-3000:], flush=True)
    return steps


if "--no-profile" not in sys.argv:
    run("profile", 10, str(out / f"host-steps-case{case_no}.txt"))
if (out / f"host-steps-case{case_no}.txt").exists():
    print((out / f"host-steps-case{case_no}.txt").read_text()[:6000], flush=True)
medians = {"gc": [], "nogc": []}
for r in range(rounds):
    for mode in ("gc", "nogc") if r % 2 == 0 else ("nogc", "gc"):
        steps = run(mode, 24)
        seconds = [s["tokens"] / s["tokens_per_s"] for s in steps[4:-1]]
        if seconds:
            medians[mode].append(statistics.median(seconds))
        print(mode, "median step s", round(medians[mode][-1], 4) if seconds else None,
              "spread", [round(x, 3) for x in (min(seconds), max(seconds))] if seconds else None, flush=True)
print({m: [round(x, 4) for x in v] for m, v in medians.items()})
