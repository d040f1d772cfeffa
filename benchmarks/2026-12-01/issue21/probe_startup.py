"""Record (2026-12-01, third round of issue 21): a one-off probe run on the H200 machine, kept as it ran; its output
is quoted in BENCHMARKS.md. Run from the repository root there: export PYTHONPATH=$PWD/.gpu-site:$PWD; python benchmarks/2026-12-01/issue21/probe_startup.py

Device probe: why the first peftctl process (bench case 1) spends seconds more before the tokenizer than later ones."""
import os, subprocess, sys, time, json
from pathlib import Path
OUT = Path(os.environ.get("OUT", "/tmp/out"))
prep = r'''
import sys; sys.path.insert(0, "scripts")
from pathlib import Path
import bench
shape = bench.LLAMA3_8B
m = Path("/tmp/m8b"); m.mkdir(exist_ok=True)
bench.write_tokenizer(m, shape.config["vocab_size"], 8192)
bench.model_config(shape).save_pretrained(str(m))
data = Path("/tmp/m8b-data.jsonl")
bench.write_dataset(data, [2048]*48, shape.config["vocab_size"], seed=1)
r = bench.peftctl_recipe(bench.CASES[1], shape, str(m), data, Path("/tmp/m8b-run1"), 10)
bench.write_recipe(Path("/tmp/case1.yaml"), r, "case 1")
print(bench.warm_imports())
'''
t = time.time(); p = subprocess.run([sys.executable, "-c", prep], capture_output=True, text=True); print("prep", round(time.time()-t,1), p.stdout[-500:], p.stderr[-1500:] if p.returncode else "")
def rows(text):
    out = {}
    for l in text.splitlines():
        if l.startswith("import time:") and "|" in l:
            parts = l.split("|")
            try: out[parts[2].strip()] = (int(parts[1]), int(parts[0].split(":")[1]))
            except ValueError: pass
    return out
runs = []
for name in ("first", "second", "third"):
    t = time.time()
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "peftctl", "train", "/tmp/case1.yaml", "--dry-run", "--force"], capture_output=True, text=True)
    wall = time.time() - t
    (OUT / f"{name}.txt").write_text(p.stderr)
    r = rows(p.stderr); runs.append(r)
    total_self = sum(v[1] for v in r.values()) / 1e6
    print(f"{name}: rc {p.returncode} wall {wall:.1f}s, imports self-sum {total_self:.1f}s, {len(r)} modules", flush=True)
    if p.returncode: print(p.stdout[-1000:], p.stderr[-2000:])
a, b = runs[0], runs[1]
diff = sorted(((a[k][1] - b.get(k, (0, 0))[1], k) for k in a), reverse=True)[:25]
print("self time, first minus second (s):")
for d, k in diff: print(f"  {d/1e6:6.3f} {k}  (first {a[k][1]/1e6:.3f})")
pkg = {}
for k, (cum, self_) in a.items():
    top = k.split(".")[0]; pkg[top] = pkg.get(top, 0) + self_
print("first run self time by package:", sorted(((round(v/1e6,2), k) for k, v in pkg.items()), reverse=True)[:15])
pkg2 = {}
for k, (cum, self_) in b.items():
    top = k.split(".")[0]; pkg2[top] = pkg2.get(top, 0) + self_
print("second run self time by package:", sorted(((round(v/1e6,2), k) for k, v in pkg2.items()), reverse=True)[:15])
