"""Does regional compilation pay? The decoder of the Llama-3-8B shape (cut to `--layers` layers), eager against
`torch.compile` of each decoder layer (one compiled graph reused by every layer), as peftctl trains it.

The model is built the way the loop builds it on the GPU: liger's RMSNorm/RoPE/SwiGLU patched in, peft's LoRA
(r 16, alpha 32, dropout 0.05, float32 adapter) on q,k,v,o (`--targets qkvo`) or every linear layer (`all`), each
adapted layer routed through peftctl's fused branch (torch's dropout, as the loop has it where the run fits
without LoRA's dropout kernel), the adapter inputs left in the autocast dtype. One step is
the decoder's forward and backward under bf16 autocast on `--rows` x `--tokens` tokens (no head: the fused loss
is not what compilation would change). Prints the median step of each, the ratio, the compile time, and how far
the two disagree with dropout off (the compiled decoder must compute the same thing).

    python scripts/bench_compile.py --layers 4 --targets qkvo

A CPU smoke run of the harness (what tests/test_bench.py runs): `--device cpu --tiny --repeats 2`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl.train.fused_lora import fuse_lora_layers
    from peftctl.train.kernels import apply_fast_kernels, skip_adapter_input_casts

    if args.tiny:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    kernels = apply_fast_kernels(model, device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if args.targets == "qkvo" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                             init_lora_weights=False))
    fused = fuse_lora_layers(model, dropout_kernel=False)  # as the loop, where the run fits without it
    if device.type == "cuda":
        skip_adapter_input_casts(model)
    model.train()
    return model, kernels, fused


def step_fn(model, hidden, grad, device):
    decoder = model.get_base_model().model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = decoder(inputs_embeds=hidden, use_cache=False).last_hidden_state
        out.backward(grad)
        return out

    return step


def timed(step, repeats, warmup, device):
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--targets", choices=["qkvo", "all"], default="qkvo")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (smoke runs)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    model, kernels, fused = build(args, device)
    width = model.config.hidden_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(args.rows, args.tokens, width, generator=gen).to(device, dtype).requires_grad_(False)
    grad = (torch.randn(args.rows, args.tokens, width, generator=gen) * 1e-3).to(device, dtype)
    step = step_fn(model, hidden, grad, device)

    # Same computation first, dropout off: eager and compiled outputs and adapter gradients.
    def outputs():
        model.eval()
        model.zero_grad(set_to_none=True)
        # a copy of the gradient each time: liger's final RMSNorm (in place) writes its input gradient over the one
        # it is given, so the timed steps leave `grad` changed
        out = step_fn(model, hidden, grad.clone(), device)().float()
        grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        model.train()
        return out, grads

    eager_out, eager_grads = outputs()
    eager_s = timed(step, args.repeats, args.warmup, device)
    layers = model.get_base_model().model.layers
    t0 = time.perf_counter()
    for layer in layers:
        layer.compile()
    compiled_out, compiled_grads = outputs()  # the first call compiles
    compile_s = time.perf_counter() - t0
    compiled_s = timed(step, args.repeats, args.warmup, device)

    def rel(a, b):
        return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)

    grad_diff = max(rel(a, b) for a, b in zip(eager_grads, compiled_grads))
    tokens = args.rows * args.tokens
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "layers": args.layers, "targets": args.targets, "tokens": tokens,
              "kernels": kernels, "fused_lora_layers": fused, "eager_step_s": eager_s, "compiled_step_s": compiled_s,
              "ratio": eager_s / compiled_s, "compile_s": compile_s,
              "rel_diff_output": rel(eager_out, compiled_out), "rel_diff_adapter_grads": grad_diff,
              "eager_tok_s": tokens / eager_s, "compiled_tok_s": tokens / compiled_s}
    print(f"decoder of {args.layers} layers, LoRA on {args.targets}, {tokens} tokens, {device.type}: eager "
          f"{eager_s * 1000:.1f} ms, regional compile {compiled_s * 1000:.1f} ms a step -> {result['ratio']:.3f}x "
          f"(compile {compile_s:.1f} s); output / adapter-gradient relative difference "
          f"{result['rel_diff_output']:.1e} / {grad_diff:.1e}; kernels {kernels}, fused branch on {fused} layers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
