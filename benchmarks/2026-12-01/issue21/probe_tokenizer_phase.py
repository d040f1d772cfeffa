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
