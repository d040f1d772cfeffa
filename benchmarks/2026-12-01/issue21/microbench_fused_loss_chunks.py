"""Record (2026-12-01, third round of issue 21): a one-off probe run on the H200 machine, kept as it ran; its output
is quoted in BENCHMARKS.md. Run from the repository root there: export PYTHONPATH=$PWD/.gpu-site:$PWD; python benchmarks/2026-12-01/issue21/microbench_fused_loss_chunks.py

Device micro-benchmark: liger's fused linear cross-entropy at case 1's shapes, by chunk budget."""
import time, torch, inspect
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F
torch.manual_seed(0)
BT, H, V = 8188, 4096, 128256
dev = "cuda"
W = (torch.randn(V, H, device=dev, dtype=torch.bfloat16) * 0.02)
x0 = torch.randn(BT, H, device=dev, dtype=torch.bfloat16)
y = torch.randint(0, V, (BT,), device=dev)
print("signature has chunk_mem_const:", "chunk_mem_const" in inspect.signature(F.forward).parameters)

def run(c):
    x = x0.clone().requires_grad_(True)
    args = [x, W, y, None, None, -100, 0.0, 0.0, "sum", None, False, None, False, False, False, None, None, c]
    loss = F.apply(*args)[0]
    (loss * (1.0 / BT)).backward()
    return loss.detach(), x.grad

def timeit(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n

ref_loss, ref_grad = run(1)
for c in (1, 2, 4, 8, 16, 32):
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    ms = timeit(lambda: run(c))
    loss, grad = run(c)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"chunk_mem_const {c:2d}: {ms:7.2f} ms fwd+bwd, peak +{peak:7.0f} MiB, loss diff {abs(loss-ref_loss).item():.3g} "
          f"(loss {ref_loss.item():.6g}), grad max diff {(grad.float()-ref_grad.float()).abs().max().item():.3g}", flush=True)

# the GEMMs alone at full size
g = torch.randn(BT, V, device=dev, dtype=torch.bfloat16)
def gemms():
    torch.mm(x0, W.t()); torch.mm(g, W)
ms = timeit(gemms)
flops = 2 * 2 * BT * H * V
print(f"two full GEMMs: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
for M in (256, 512, 1024, 2048, 8188):
    a = x0[:M].contiguous(); gg = g[:M].contiguous()
    n = BT // M
    f1 = lambda: [torch.mm(a, W.t()) for _ in range(n)]
    f2 = lambda: [torch.mm(gg, W) for _ in range(n)]
    t1, t2 = timeit(f1, 5), timeit(f2, 5)
    print(f"M={M:5d} x{n:2d}: logits GEMMs {t1:.2f} ms, grad GEMMs {t2:.2f} ms, {2*n*M*H*V*2/(t1+t2)/1e9:.0f} TFLOP/s")

# fused AdamW step for 448 LoRA tensors (case 3's adapter), host time
params = []
for _ in range(32):
    for (i, o) in [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]:
        params += [torch.nn.Parameter(torch.zeros(16, i, device=dev)), torch.nn.Parameter(torch.zeros(o, 16, device=dev))]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
for p in params: p.grad = torch.ones_like(p)
for _ in range(3): opt.step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20): opt.step()
host = (time.perf_counter() - t) / 20
torch.cuda.synchronize()
gpu = (time.perf_counter() - t) / 20
t = time.perf_counter()
for _ in range(20): opt.zero_grad(set_to_none=True); [setattr(p, "grad", None) for p in params]
print(f"fused AdamW, {len(params)} tensors: host {host*1e3:.2f} ms a step (with the GPU's work {gpu*1e3:.2f}); zero_grad {(time.perf_counter()-t)/20*1e3:.2f} ms")
