"""Record (2026-12-01, third round of issue 21): a one-off probe run on the H200 machine, kept as it ran (its second
form: modes 0, 2, 3, 4; the first ran modes 0-2 over four tile shapes); its output is quoted in BENCHMARKS.md. Run
from the repository root there: export PYTHONPATH=$PWD/.gpu-site:$PWD; python
benchmarks/2026-12-01/issue21/microbench_dropout_variants.py

Modes: 0 Philox four at a time (the module today), 1 Philox one per element, 2 one integer hash of position + seed,
3 the seed hashed, then two hashes of the position, 4 Philox four at a time with 7 rounds instead of 10.

Device micro-benchmark: LoRA's dropout kernels, mask generator variants and tiles, against torch's dropout path.
One LoRA-A side (the part dropout touches) on 8192 tokens, bf16, r 16: forward + grad_x + grad_A."""
import sys, statistics, torch, triton, triton.language as tl
sys.path.insert(0, ".")
from peftctl.train import lora_dropout_kernel as K

@triton.jit
def keep_mask(seed, rows, cols, k0, in_features, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        return K._keep(seed, rows, k0, in_features, p, BLOCK_M, BLOCK_K)
    elif MODE == 1:
        u = tl.rand(seed, rows[:, None] * in_features + cols[None, :])
        return u >= p
    elif MODE == 2:
        c = (rows[:, None] * in_features + cols[None, :]).to(tl.uint32)
        h = c * 0x9E3779B1 + seed.to(tl.uint32)
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p
    elif MODE == 3:
        k = seed.to(tl.uint32)
        k ^= k >> 16
        k *= 0x7FEB352D
        k ^= k >> 15
        k *= 0x846CA68B
        k ^= k >> 16
        h = (rows[:, None] * in_features + cols[None, :]).to(tl.uint32) ^ k
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
        h += k
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p
    else:
        quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        u0, u1, u2, u3 = tl.rand4x(seed, rows[:, None] * tl.cdiv(in_features, 4) + quads[None, :], 7)
        u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_M, BLOCK_K))
        return u >= p

@triton.jit
def fwd(x_ptr, a_ptr, h_ptr, seed_ptr, tokens, in_features, r, cols_per_split, p, scale,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    first = split * cols_per_split
    end = tl.minimum(first + cols_per_split, in_features)
    for k0 in range(first, end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < tokens) & (cols[None, :] < end)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * in_features + cols[None, :], mask=inside, other=0.0)
        keep = keep_mask(seed, rows, cols, k0, in_features, p, BLOCK_M, BLOCK_K, MODE)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        a_t = tl.load(a_ptr + ranks[None, :] * in_features + cols[:, None], mask=(ranks[None, :] < r) & (cols[:, None] < end), other=0.0)
        acc += tl.dot(dropped, a_t)
    tl.store(h_ptr + split * tokens * r + rows[:, None] * r + ranks[None, :], acc, mask=(rows[:, None] < tokens) & (ranks[None, :] < r))

@triton.jit
def gin(gh_ptr, a_ptr, gx_ptr, seed_ptr, tokens, in_features, r, p, scale,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    gh = tl.load(gh_ptr + rows[:, None] * r + ranks[None, :], mask=(rows[:, None] < tokens) & (ranks[None, :] < r), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :], mask=(ranks[:, None] < r) & (cols[None, :] < in_features), other=0.0)
    acc = tl.dot(gh, a)
    seed = tl.load(seed_ptr)
    keep = keep_mask(seed, rows, cols, tl.program_id(1) * BLOCK_K, in_features, p, BLOCK_M, BLOCK_K, MODE)
    grad = tl.where(keep, acc * scale, 0.0)
    ptrs = gx_ptr + rows[:, None].to(tl.int64) * in_features + cols[None, :]
    m = (rows[:, None] < tokens) & (cols[None, :] < in_features)
    if ACC:
        grad += tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    tl.store(ptrs, grad.to(gx_ptr.dtype.element_ty), mask=m)

@triton.jit
def gw(gh_ptr, x_ptr, ga_ptr, seed_ptr, tokens, in_features, r, rows_per_split, p, scale,
       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = split * rows_per_split
    end = tl.minimum(first + rows_per_split, tokens)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        gh_t = tl.load(gh_ptr + rows[None, :] * r + ranks[:, None], mask=(rows[None, :] < end) & (ranks[:, None] < r), other=0.0)
        inside = (rows[:, None] < end) & (cols[None, :] < in_features)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * in_features + cols[None, :], mask=inside, other=0.0)
        keep = keep_mask(seed, rows, cols, tl.program_id(0) * BLOCK_K, in_features, p, BLOCK_M, BLOCK_K, MODE)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        acc += tl.dot(gh_t, dropped)
    tl.store(ga_ptr + split * r * in_features + ranks[:, None] * in_features + cols[None, :], acc, mask=(ranks[:, None] < r) & (cols[None, :] < in_features))

def ms(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

p, r = 0.05, 16
for T, IN in ((8192, 4096), (8192, 14336)):
    x = torch.randn(T, IN, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(r, IN, device="cuda", dtype=torch.bfloat16) * 0.02
    gh = torch.randn(T, r, device="cuda", dtype=torch.bfloat16)
    gbase = torch.randn(T, IN, device="cuda", dtype=torch.bfloat16)
    seed = K.draw_seed(torch.device("cuda"))
    def torch_path():
        d, m = torch.native_dropout(x, p, True)
        h = d @ A.t()
        ga = gh.t() @ d
        gx = torch.ops.aten.native_dropout_backward(gh @ A, m, 1 / (1 - p))
        return gx.add_(gbase)  # the base's part joins it (today: addmm_ into it)
    def module_path():
        h = K.dropout_a_forward(x, A, seed, p)
        ga = K.dropout_a_grad_weight(gh, x, seed, p)
        gx = K.dropout_a_grad_input(gh, A, seed, p, x.dtype)
        return gx.add_(gbase)
    print(f"T {T} in {IN}: torch dropout path {ms(torch_path):.3f} ms; the module's kernels {ms(module_path):.3f} ms", flush=True)
    for mode in (0, 2, 3, 4):
        for bm, bk, warps in ((64, 128, 4), (64, 64, 4)):
            def f_fwd():
                row_blocks = triton.cdiv(T, bm)
                splits, per = K._split(IN, bk, row_blocks)
                part = torch.empty(splits, T, r, device="cuda", dtype=torch.float32)
                fwd[(row_blocks, splits)](x, A, part, seed, T, IN, r, per, p, 1 / (1 - p), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=16, MODE=mode, num_warps=warps)
                return part.sum(0)
            def f_gin(acc):
                gx = gbase.clone() if acc else torch.empty_like(x)
                gin[(triton.cdiv(T, bm), triton.cdiv(IN, bk))](gh, A, gx, seed, T, IN, r, p, 1 / (1 - p), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=16, MODE=mode, ACC=acc, num_warps=warps)
                return gx
            def f_gw():
                cb = triton.cdiv(IN, bk)
                splits, per = K._split(T, bm, cb)
                part = torch.empty(splits, r, IN, device="cuda", dtype=torch.float32)
                gw[(cb, splits)](gh, x, part, seed, T, IN, r, per, p, 1 / (1 - p), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=16, MODE=mode, num_warps=warps)
                return part.sum(0)
            try:
                a, b, c = ms(f_fwd), ms(lambda: f_gin(False)), ms(f_gw)
                clone = ms(lambda: gbase.clone())
                acc = ms(lambda: f_gin(True)) - clone
                print(f"  mode {mode} tiles {bm}x{bk} warps {warps}: fwd {a:.3f} grad_x {b:.3f} (accumulating {acc:.3f}) grad_A {c:.3f}; "
                      f"total {a+b+c:.3f}, with the add fused {a+acc+c:.3f}", flush=True)
            except Exception as e:
                print(f"  mode {mode} tiles {bm}x{bk} warps {warps}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
    add = ms(lambda: gbase.clone().add_(gbase)) - ms(lambda: gbase.clone())
    print(f"  (an add of the base's part: {add:.3f} ms)", flush=True)
