"""What `peftctl train`'s tokenizer phase spends on the GPU machine (10 s there in run K, 1.3 s on a laptop CPU):
in a fresh process, torch's import, transformers' AutoTokenizer import, and AutoTokenizer.from_pretrained on the
bench's word-level tokenizer (128,256 ids) under cProfile.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/probe_tokenizer_phase.py OUT
"""
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
folder = out / "tok"
if not folder.exists():
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import bench; "
                    f"from pathlib import Path; bench.write_tokenizer(Path({str(folder)!r}), 128256, 2048)"],
                   check=True)
    subprocess.run([sys.executable, __file__, str(out)], check=True)  # the measurement, in a fresh process
    # Which modules the import spends on: -X importtime's self time, by module and by top-level package
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; from transformers import "
                           "AutoTokenizer"], capture_output=True, text=True, check=True)
    before = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True,
                            text=True, check=True)

    def self_us(text):
        rows = {}
        for line in text.splitlines():
            parts = line.split("|")
            if line.startswith("import time:") and len(parts) == 3 and parts[0].split(":")[1].strip().isdigit():
                rows[parts[2].strip()] = int(parts[0].split(":")[1])
        return rows

    def parents(text):
        """Each module's importer: -X importtime prints a module after the modules it imported, indented by two
        spaces a level, so a line's importer is the next line one level out."""
        parent, waiting = {}, {}
        for line in text.splitlines():
            parts = line.split("|")
            if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
                continue
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip())) // 2
            name = name.strip()
            for child in waiting.pop(depth + 1, []):
                parent[child] = name
            waiting.setdefault(depth, []).append(name)
        return parent

    torch_rows, rows = self_us(before.stderr), self_us(done.stderr)
    importer = parents(done.stderr)
    extra = {name: us for name, us in rows.items() if name not in torch_rows}
    by_package = {}
    for name, us in extra.items():
        by_package[name.split(".")[0]] = by_package.get(name.split(".")[0], 0) + us
    print(f"after torch: {len(extra)} modules, {sum(extra.values()) / 1e6:.2f} s self time")
    print("by package (s):", [(p, round(us / 1e6, 2)) for p, us in sorted(by_package.items(), key=lambda x: -x[1])[:15]])
    print("largest (s):", [(n, round(us / 1e6, 3)) for n, us in sorted(extra.items(), key=lambda x: -x[1])[:25]])
    # What pulled each heavy package in: the chain of importers from its first module up to the import statement
    for package in [p for p, _ in sorted(by_package.items(), key=lambda x: -x[1])[:8] if p != "transformers"]:
        first = next(name for name in rows if name.split(".")[0] == package and name in extra)
        chain = [first]
        while chain[-1] in importer and len(chain) < 40:
            chain.append(importer[chain[-1]])
        print(f"{package} came through:", " <- ".join(chain))
    sys.exit(0)

t0 = time.time()
import torch  # noqa: E402,F401

t1 = time.time()
from transformers import AutoTokenizer  # noqa: E402

t2 = time.time()
profile = cProfile.Profile()
profile.enable()
tok = AutoTokenizer.from_pretrained(str(folder))
profile.disable()
t3 = time.time()
print(f"torch import {t1 - t0:.2f} s, AutoTokenizer import {t2 - t1:.2f} s, from_pretrained {t3 - t2:.2f} s")
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
print(text.getvalue())
