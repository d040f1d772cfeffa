"""Packed rows' document-causal attention (case 2's shape: 4 rows of 2048 tokens, documents of log-normal length,
median 330, sigma 1.0; Llama-3-8B heads, bf16): torch's varlen flash kernel, as the loop calls it today, against
cuDNN's ragged (cumulative-length) attention, which torch's varlen module has wired but switched off
(`_should_use_cudnn` returns False). Prints the ops' schemas, whether cuDNN takes the call with the key/value
heads as they are or only repeated, how far its outputs and gradients are from flash's, and forward+backward GPU
time (CUDA events, median of 5 x 10 calls).

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-01/issue21/microbench_varlen_cudnn.py
"""
import inspect

import gpu_timing  # this folder's shared timer
import torch
from torch.nn.attention.varlen import varlen_attn

print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
print("varlen_attn", inspect.signature(varlen_attn))
for name in ("_cudnn_attention_forward", "_cudnn_attention_backward"):
    print(name, getattr(torch.ops.aten, name).default._schema)


def gpu_ms(fn):
    return gpu_timing.gpu_ms(fn, calls=10, warmup=3)


def documents(rows, length, generator):
    lengths = []
    for _ in range(rows):
        left = length
        while left > 0:
            n = int(min(max(8, torch.empty(1).log_normal_(mean=5.8, std=1.0, generator=generator).item()), 2048))
            lengths.append(min(n, left))
            left -= lengths[-1]
    return lengths


generator = torch.Generator().manual_seed(0)
for rows, heads, kv_heads in ((4, 32, 8), (1, 32, 8)):
    lengths = documents(rows, 2048, generator)
    tokens = rows * 2048
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    max_len = max(lengths)
    flops = sum(4 * n * n / 2 * 128 * heads for n in lengths) * 3.5
    print(f"\n{rows} x 2048: {len(lengths)} documents, longest {max_len}")
    torch.manual_seed(0)
    q = torch.randn(tokens, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, heads, 128, device="cuda", dtype=torch.bfloat16)
    groups = heads // kv_heads

    def flash():
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))

    def cudnn(repeat):
        def call():
            kk, vv = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) if repeat else (k, v)
            # the op has an autograd formula (derivatives.yaml): its backward is _cudnn_attention_backward
            return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu, cu, max_len, max_len, True, 0.0,
                                                           True, False)[0]
        return call

    results = {}
    for label, fn in (("flash (today)", flash), ("cudnn, kv as they are", cudnn(False)),
                      ("cudnn, kv repeated", cudnn(True))):
        try:
            for t in (q, k, v):
                t.grad = None
            phase = "forward"
            out = fn()
            phase = "backward"
            out.backward(grad)
            results[label] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]

            def step(fn=fn):
                for t in (q, k, v):
                    t.grad = None
                fn().backward(grad)
            ms = gpu_ms(step)
            base = results["flash (today)"]
            diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results[label], base)]
            print(f"  {label:24s} {ms:7.3f} ms fwd+bwd {flops / ms / 1e9:5.0f} TFLOP/s  rel diff out/dq/dk/dv "
                  + " ".join(f"{d:.1e}" for d in diffs))
        except Exception as error:  # noqa: BLE001 - a probe: say why a path refuses
            print(f"  {label:24s} refused in {phase}: {type(error).__name__}: {str(error).splitlines()[0][:140]}")
