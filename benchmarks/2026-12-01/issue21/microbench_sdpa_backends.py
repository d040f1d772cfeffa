"""Causal attention of the Llama-3-8B shape (32 query heads, 8 key/value heads, head dim 128, bf16), forward and
backward, through each of SDPA's CUDA backends: what SDPA picks by default for the call transformers makes on
unpacked rows (no mask, is_causal, enable_gqa), and what each backend costs when forced, with the key/value heads
as they are (enable_gqa) or repeated first (repeat_kv, its copy and its backward included). GPU time by CUDA
events, median of 5 x 10 calls. Also the same for the packed rows' varlen kernel (documents of a case-2-like
length mix) against cuDNN, where cuDNN takes the call.

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/microbench_sdpa_backends.py
"""

import gpu_timing  # this folder's shared timer
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
try:
    print("priority order:", torch._C._get_sdp_priority_order())
except Exception as error:  # noqa: BLE001 - a probe: print what this torch lacks
    print("priority order: not readable", error)


def gpu_ms(fn):
    return gpu_timing.gpu_ms(fn, calls=10, warmup=3)


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def step(q, k, v, grad, *, gqa, repeat):
    def run():
        for t in (q, k, v):
            t.grad = None
        kk, vv = (repeat_kv(k, 4), repeat_kv(v, 4)) if repeat else (k, v)
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        out.backward(grad)
    return run


for batch, seq in ((4, 2048), (1, 2048), (1, 8192)):
    torch.manual_seed(0)
    q = torch.randn(batch, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
    flops = 4 * batch * 32 * seq * seq * 128 / 2 * 3.5  # causal; backward ~2.5x the forward
    try:
        choice = torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)
        print(f"\nB={batch} S={seq}: default choice for enable_gqa: {SDPBackend(choice).name}")
    except Exception as error:  # noqa: BLE001
        print(f"\nB={batch} S={seq}: default choice not readable: {error}")
    reference = None
    for label, backends, gqa, repeat in (
            ("default, enable_gqa", None, True, False),
            ("flash, enable_gqa", [SDPBackend.FLASH_ATTENTION], True, False),
            ("cudnn, enable_gqa", [SDPBackend.CUDNN_ATTENTION], True, False),
            ("efficient, enable_gqa", [SDPBackend.EFFICIENT_ATTENTION], True, False),
            ("flash, repeat_kv", [SDPBackend.FLASH_ATTENTION], False, True),
            ("cudnn, repeat_kv", [SDPBackend.CUDNN_ATTENTION], False, True),
            ("cudnn first (priority), enable_gqa",
             [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], True, False)):
        fn = step(q, k, v, grad, gqa=gqa, repeat=repeat)
        try:
            if backends is None:
                ms = gpu_ms(fn)
            elif label.startswith("cudnn first"):
                with sdpa_kernel(backends, set_priority=True):
                    ms = gpu_ms(fn)
            else:
                with sdpa_kernel(backends):
                    ms = gpu_ms(fn)
            with torch.no_grad():
                ctx = sdpa_kernel(backends) if backends else torch.enable_grad()
                with ctx:
                    kk, vv = (repeat_kv(k, 4), repeat_kv(v, 4)) if repeat else (k, v)
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            if reference is None:
                reference = out
            diff = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            print(f"  {label:38s} {ms:8.3f} ms fwd+bwd  {flops / ms / 1e9:6.0f} TFLOP/s  max rel diff {diff:.1e}")
        except Exception as error:  # noqa: BLE001 - a backend that refuses the call says why
            print(f"  {label:38s} refused: {str(error).splitlines()[0][:110]}")
