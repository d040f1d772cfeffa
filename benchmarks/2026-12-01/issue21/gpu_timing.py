"""GPU time per call for this folder's micro-benchmarks: CUDA events around `calls` calls after a warm-up, the
median of `repeats` such runs, in milliseconds. Imported by the scripts beside it (their folder is on sys.path when
they run)."""
import statistics

import torch


def gpu_ms(fn, calls=50, repeats=5, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)
