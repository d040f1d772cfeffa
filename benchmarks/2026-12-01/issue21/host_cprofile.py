"""cProfile of the host's work in the forward and backward passes of 4 decoder layers of the 8B shape (4-bit
all-linear, or --quant none --targets qkvo), the backward on the calling thread; then a step's time with autograd's
device threads on and off.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/host_cprofile.py
"""
import argparse, cProfile, pstats, sys, io
sys.path.insert(0, "scripts")
import torch
import profile_step

p = argparse.ArgumentParser()
p.add_argument("--quant", default="4bit")
p.add_argument("--targets", default="all")
a = p.parse_args()
args = argparse.Namespace(layers=4, targets=a.targets, quant=a.quant, rows=4, tokens=2048, tiny=False)
device = torch.device("cuda")
model, kernels, routed = profile_step.build(args, device, fused=True)
decoder = model.get_base_model().model
gen = torch.Generator(device="cpu").manual_seed(1)
hidden = torch.randn(4, 2048, 4096, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
grad = (torch.randn(4, 2048, 4096, generator=gen) * 1e-3).to(device, torch.bfloat16)

def fwd():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return decoder(inputs_embeds=hidden, use_cache=False).last_hidden_state

for _ in range(3):
    fwd().backward(grad)
torch.cuda.synchronize()
pr = cProfile.Profile()
outs = []
for _ in range(5):
    torch.cuda.synchronize()
    pr.enable()
    out = fwd()
    pr.disable()
    out.backward(grad)
torch.cuda.synchronize()
s = io.StringIO()
st = pstats.Stats(pr, stream=s)
st.sort_stats("tottime").print_stats(35)
st.sort_stats("cumulative").print_stats(45)
print(s.getvalue())

# the backward's Python, run on this thread
pr2 = cProfile.Profile()
with torch.autograd.set_multithreading_enabled(False):
    for _ in range(5):
        out = fwd()
        torch.cuda.synchronize()
        pr2.enable()
        out.backward(grad)
        pr2.disable()
        torch.cuda.synchronize()
s = io.StringIO()
st = pstats.Stats(pr2, stream=s)
st.sort_stats("tottime").print_stats(30)
print("=== BACKWARD")
print(s.getvalue())
import time
for mt in (True, False, True, False):
    with torch.autograd.set_multithreading_enabled(mt):
        ts = []
        for _ in range(8):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            fwd().backward(grad)
            torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        ts.sort()
        print("multithreading", mt, "median ms", ts[4] * 1000)
