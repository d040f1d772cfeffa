"""liger's fused linear cross-entropy at the Llama-3-8B head (4,096 -> 128,256, bf16, the head frozen), forward
and backward, over its `chunk_mem_const` (how many hidden-state-sized buffers one chunk of logits may take: 1, the
default, gives 256-token chunks at 8,192 tokens): does a larger chunk make the head's GEMMs faster? Prints the
median ms and the peak memory above the inputs for each, and the two GEMMs' time at the matmul rate measured here.

    python benchmarks/2026-12-02/issue21/microbench_fused_loss_chunks.py --tokens 8188 2047
"""

import argparse
import statistics

import torch
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction


def timed(fn, repeats=10, warmup=3):
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[8188, 2047])
    parser.add_argument("--consts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = parser.parse_args()
    hidden, vocab = 4096, 128256
    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden, device="cuda") * 0.02).to(torch.bfloat16)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = timed(lambda: a @ a)
    rate = 2 * 8192**3 / (mm_ms / 1000) / 1e12
    print(f"bf16 matmul 8192^3: {mm_ms:.3f} ms, {rate:.0f} TFLOP/s")
    del a
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) * 0.5
        target = torch.randint(0, vocab, (tokens,), device="cuda")
        floor = 2 * 2 * tokens * hidden * vocab / (rate * 1e12) * 1000
        print(f"{tokens} tokens: the two GEMMs at that rate {floor:.2f} ms")
        reference = None
        for const in args.consts:
            xg = x.detach().clone().requires_grad_(True)

            def step():
                loss = LigerFusedLinearCrossEntropyFunction.apply(
                    xg, weight, target, None, None, -100, 0.0, 0.0, "sum", None, False, None, False, False, False,
                    None, None, const)[0]
                loss.backward()
                return loss

            loss = step()
            if reference is None:
                reference = (loss.item(), xg.grad.float().clone())
            same = abs(loss.item() - reference[0]) <= 1e-3 * abs(reference[0])
            cos = torch.nn.functional.cosine_similarity(xg.grad.float().flatten(), reference[1].flatten(), dim=0)
            xg.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = timed(lambda: (step(), setattr(xg, "grad", None)))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"  chunk_mem_const {const:3d}: {ms:7.2f} ms ({floor / ms:.0%} of the GEMM floor), transient peak "
                  f"{peak:8.1f} MiB; loss same {same}, grad cosine {cos.item():.6f}")


if __name__ == "__main__":
    main()
