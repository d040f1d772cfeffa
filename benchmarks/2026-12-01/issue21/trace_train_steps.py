"""The GPU's idle time inside real training steps: builds the bench's 8B model folder, then for each case runs
`peftctl train` on bench.py's recipe in its own process (trace_one_run.py), steps 7-8 under torch.profiler (CUDA
activity only), and writes what trace_one_run.py prints to OUT/trace-caseN.txt.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/trace_train_steps.py $OUT 1,3
"""
import sys, subprocess, tempfile, os
from pathlib import Path
sys.path.insert(0, "scripts")
import bench
out = Path(sys.argv[1]); cases = [int(c) for c in sys.argv[2].split(",")]
work = Path(tempfile.mkdtemp(dir="/tmp"))
shape = bench.LLAMA3_8B
prep = bench.worker_prepare(work, shape)
print("prepared", prep["total_s"], flush=True)
for n in cases:
    case = bench.CASES[n]
    data = work / f"case{n}.jsonl"
    bench.write_dataset(data, bench.example_lengths(case, shape, 12), shape.config["vocab_size"], 42)
    recipe = work / f"case{n}.yaml"
    r = bench.peftctl_recipe(case, shape, prep["model_dir"], data, work / "runs" / f"case{n}", 10)
    bench.write_recipe(recipe, r, f"case {n}")
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("trace_one_run.py")), str(recipe), str(work / f"trace{n}.json")],
                       capture_output=True, text=True)
    (out / f"trace-case{n}.txt").write_text(p.stdout + "\n--- stderr\n" + p.stderr[-5000:])
    print(f"case {n}", p.returncode, flush=True)
    print(p.stdout[:3000], flush=True)
