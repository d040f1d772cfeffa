"""Record (2026-12-01, third round of issue 21): a one-off probe run on the H200 machine, kept as it ran; its output
is quoted in BENCHMARKS.md. Run from the repository root there: export PYTHONPATH=$PWD/.gpu-site:$PWD; python benchmarks/2026-12-01/issue21/probe_imports.py

Device probe: where the seconds before the first step go, import by import (fresh processes)."""
import os, subprocess, sys, time, json
from pathlib import Path
OUT = Path(os.environ.get("OUT", "/tmp/out"))
sys.path.insert(0, "scripts")
tk = Path("/tmp/tk")
if not (tk / "tokenizer.json").exists():
    t = time.time()
    import bench
    bench.write_tokenizer(tk, 128256, 8192)
    print("tokenizer written", round(time.time() - t, 1), flush=True)

PEFTCTL = """
import time; t0=time.time(); T={}
def m(k):
    global t0; t=time.time(); T[k]=round(t-t0,3); t0=t
import torch; m('torch')
import transformers; m('transformers')
from transformers import AutoTokenizer; m('AutoTokenizer')
tok=AutoTokenizer.from_pretrained('/tmp/tk'); m('tokenizer_load')
import datasets; m('datasets')
torch.cuda.init(); torch.zeros(1, device='cuda'); m('cuda_init')
import bitsandbytes; m('bitsandbytes')
import peft; m('peft')
from transformers import AutoModelForCausalLM; m('AutoModelForCausalLM')
import liger_kernel.transformers; m('liger')
print('PHASES', T)
"""
REFERENCE = """
import time; t0=time.time(); T={}
def m(k):
    global t0; t=time.time(); T[k]=round(t-t0,3); t0=t
import torch; m('torch')
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments; m('transformers+Trainer')
tok=AutoTokenizer.from_pretrained('/tmp/tk'); m('tokenizer_load')
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training; m('peft')
torch.zeros(1, device='cuda'); m('cuda_init')
print('PHASES', T)
"""
def run(name, code, importtime=True):
    args = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-c", code]
    t = time.time()
    p = subprocess.run(args, capture_output=True, text=True)
    wall = time.time() - t
    (OUT / f"{name}.importtime.txt").write_text(p.stderr)
    line = [l for l in p.stdout.splitlines() if l.startswith("PHASES")]
    print(f"{name}: wall {wall:.2f}s {line[0] if line else p.stdout[-500:] + p.stderr[-2000:]}", flush=True)
    if importtime:
        rows = []
        for l in p.stderr.splitlines():
            if l.startswith("import time:") and "|" in l:
                parts = l.split("|")
                try:
                    rows.append((int(parts[1]), int(parts[0].split(":")[1]), parts[2].rstrip()))
                except ValueError:
                    pass
        rows.sort(reverse=True)
        for cum, self_, mod in rows[:12]:
            print(f"   {cum/1e6:6.2f} s cum {self_/1e6:6.2f} self {mod}")
run("peftctl_cold", PEFTCTL)
run("reference", REFERENCE)
run("peftctl_warm", PEFTCTL)
run("peftctl_warm_noimporttime", PEFTCTL, importtime=False)
run("reference_noimporttime", REFERENCE, importtime=False)
t = time.time(); p = subprocess.run([sys.executable, "-X", "importtime", "-m", "peftctl", "--help"], capture_output=True, text=True)
print("peftctl --help", round(time.time() - t, 2)); (OUT / "cli_help.importtime.txt").write_text(p.stderr)
