"""peftctl train RECIPE in this process, steps 7-8 under torch.profiler (CUDA only): the GPU's idle time in a real
training step, and what it waits before."""
import sys, time, os, statistics
sys.path.insert(0, "scripts")
import torch
import peftctl.train.loop as loop
import profile_step

recipe, trace = sys.argv[1], sys.argv[2]
original = loop.forward_backward  # called once a step, at its launch (the loop may launch it ahead of a settle)
state = {"n": 0, "walls": [], "t": None}
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])


def wrapped(run, batches, after=None):
    """Steps 7 and 8 under the profiler: from step 7's launch to step 9's (both steps' updates and the boundary
    between them). The walls are the host's time from one launch to the next."""
    state["n"] += 1
    n = state["n"]
    now = time.perf_counter()
    if state["t"] is not None:
        state["walls"].append((n - 1, now - state["t"]))
    state["t"] = now
    if n == 7:
        torch.cuda.synchronize()
        prof.__enter__()
    if n == 9:
        torch.cuda.synchronize()
        prof.__exit__(None, None, None)
    return original(run, batches, after)


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
loop.forward_backward = wrapped
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
