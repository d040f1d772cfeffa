"""peftctl train RECIPE in this process, steps 7-8 under torch.profiler (CUDA only): the GPU's idle time in a real
training step, and what it waits before."""
import sys, time, os, statistics
sys.path.insert(0, "scripts")
import torch
import peftctl.train.loop as loop
import profile_step

recipe, trace = sys.argv[1], sys.argv[2]
original = loop.train_step
state = {"n": 0, "walls": []}
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])


def wrapped(run, batches, stop):
    state["n"] += 1
    n = state["n"]
    if n == 7:
        torch.cuda.synchronize()
        prof.__enter__()
    t0 = time.perf_counter()
    out = original(run, batches, stop)
    state["walls"].append((n, time.perf_counter() - t0))
    if n == 8:
        torch.cuda.synchronize()
        prof.__exit__(None, None, None)
    return out


import gc
gc_log = {"t": None, "spent": [], "in_loop": False}
def on_gc(phase, info):
    if not state["n"]:
        return
    if phase == "start":
        gc_log["t"] = time.perf_counter()
    elif gc_log["t"] is not None:
        gc_log["spent"].append((info["generation"], time.perf_counter() - gc_log["t"]))
gc.callbacks.append(on_gc)
loop.train_step = wrapped
from peftctl.cli.app import main
sys.argv = ["peftctl", "train", recipe, "--quiet", "--log-format", "json"]
try:
    main()
except SystemExit:
    pass
by_gen = {}
for g, t in gc_log["spent"]:
    by_gen.setdefault(g, []).append(t)
print("gc during the loop:", {g: (len(v), round(sum(v) * 1000, 1), round(max(v) * 1000, 1)) for g, v in by_gen.items()}, "(count, total ms, max ms)")
print("step walls (s):", [(n, round(w, 4)) for n, w in state["walls"]])
prof.export_chrome_trace(trace)
profile_step.print_timeline(trace, 25, 1.0, "in the two profiled steps", "the two steps")
