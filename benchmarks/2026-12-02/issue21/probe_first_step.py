"""Where peftctl's first training step goes (case 1: 3.3-4.9 s on the H200 in every run, against 1.8 s for case 2
and the reference's 1.7 s): `peftctl train` on bench.py's case recipe in a fresh process, the first call of
loop.forward_backward up to the start of the second (the whole first step: forward, backward, update, the
collector's freeze) under cProfile with autograd's device thread off, the device synchronised at both ends; then
the second step the same way, for comparison.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-02/issue21/probe_first_step.py OUT 1 [3 ...]
"""
import io
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.argv[1] == "--child":  # one run: --child RECIPE PROFILE_OUT
    recipe, profile_out = sys.argv[2], Path(sys.argv[3])
    import cProfile
    import pstats
    import time

    import torch

    import peftctl.train.loop as loop
    torch.autograd.set_multithreading_enabled(False)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    original, n, profiles, clock = loop.forward_backward, [0], {}, {}

    def wrapped(run, batches, after=None):
        n[0] += 1
        if n[0] - 1 in profiles:  # the previous step ends where this one starts
            sync()
            profiles[n[0] - 1].disable()
            clock[n[0] - 1] = time.perf_counter() - clock[n[0] - 1]
        if n[0] in (1, 2):
            sync()
            clock[n[0]] = time.perf_counter()
            profiles[n[0]] = cProfile.Profile()
            profiles[n[0]].enable()
        return original(run, batches, after)
    loop.forward_backward = wrapped
    from peftctl.cli.app import main
    sys.argv = ["peftctl", "train", recipe, "--quiet", "--log-format", "json", "--force"]
    try:
        main()
    except SystemExit:
        pass
    text = io.StringIO()
    for step, profile in profiles.items():
        if step not in clock or step == n[0]:
            continue
        print(f"==== step {step} under cProfile: {clock[step]:.3f} s", file=text)
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(70 if step == 1 else 25)
    profile_out.write_text(text.getvalue())
    sys.exit(0)

sys.path.insert(0, "scripts")
import bench  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(dir="/tmp"))
shape = bench.TINY if "--tiny" in sys.argv else bench.LLAMA3_8B
prep = bench.worker_prepare(work, shape)
print("prepared", prep["total_s"], flush=True)
for case_no in [int(a) for a in sys.argv[2:] if a.isdigit()]:
    case = bench.CASES[case_no]
    data = work / f"case{case_no}.jsonl"
    bench.write_dataset(data, bench.example_lengths(case, shape, 24, median=bench.SFT_MEDIAN, sigma=bench.SFT_SIGMA),
                        shape.config["vocab_size"], 42)
    recipe = work / f"case{case_no}.yaml"
    bench.write_recipe(recipe, bench.peftctl_recipe(case, shape, prep["model_dir"], data, work / "runs" / str(case_no),
                                                    4), f"case {case_no}")
    target = out / f"first-step-case{case_no}.txt"
    p = subprocess.run([sys.executable, __file__, "--child", str(recipe), str(target)], capture_output=True, text=True)
    if p.returncode or not target.exists():
        print(case_no, "failed", p.returncode, p.stderr[-3000:], flush=True)
        continue
    print(target.read_text()[:9000], flush=True)
