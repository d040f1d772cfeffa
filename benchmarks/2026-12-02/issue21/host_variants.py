"""Case 4 (QLoRA all-linear, 1 x 2048, checkpointing: a step the host bounds) with host-side variants of the
activation checkpointing, in turns in fresh `peftctl train` processes: the median step of steps 5-23 of each.

- now: torch.utils.checkpoint non-reentrant, as peftctl sets it (every saved tensor of the first forward goes
  through Python pack/unpack hooks; the recomputation's tensors are compared with the first's metadata);
- nocheck: the same without the recomputation's metadata check (determinism_check="none");
- reentrant: the reentrant form (the first forward under no_grad: no autograd graph, no saved tensors, no hooks;
  the backward reruns the layer with grad on and calls backward on it).

    PYTHONPATH=$PWD/.gpu-site:$PWD python benchmarks/2026-12-02/issue21/host_variants.py OUT [ROUNDS] [VARIANTS]
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.argv[1] == "--child":  # one run: --child VARIANT RECIPE
    variant, recipe = sys.argv[2], sys.argv[3]
    import peftctl.model as model_module

    if variant != "now":
        def enable(model):
            kwargs = {"use_reentrant": variant == "reentrant"}
            if variant == "nocheck":
                kwargs["determinism_check"] = "none"
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
        model_module.enable_gradient_checkpointing = enable
    from peftctl.cli.app import main
    sys.argv = ["peftctl", "train", recipe, "--quiet", "--log-format", "json", "--force"]
    main()

sys.path.insert(0, "scripts")
import bench  # noqa: E402

out = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["now", "reentrant", "nocheck"]
work = Path(tempfile.mkdtemp(dir="/tmp"))
shape = bench.TINY if "--tiny" in sys.argv else bench.LLAMA3_8B
prep = bench.worker_prepare(work, shape)
print("prepared", prep["total_s"], flush=True)
case = bench.CASES[4]
data = work / "case4.jsonl"
bench.write_dataset(data, bench.example_lengths(case, shape, 24, median=bench.SFT_MEDIAN, sigma=bench.SFT_SIGMA),
                    shape.config["vocab_size"], 42)
recipe = work / "case4.yaml"
medians, losses = {v: [] for v in variants}, {}
for r in range(rounds):
    for variant in variants if r % 2 == 0 else variants[::-1]:
        bench.write_recipe(recipe, bench.peftctl_recipe(case, shape, prep["model_dir"], data, work / "runs" / variant,
                                                        24), "case 4")
        p = subprocess.run([sys.executable, __file__, "--child", variant, str(recipe)], capture_output=True, text=True)
        steps = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"type": "step"')]
        (out / f"host-variants-{variant}-{r}.log").write_text(p.stdout + p.stderr)
        if p.returncode or not steps:
            print(variant, "failed", p.returncode, p.stderr[-2000:], flush=True)
            continue
        seconds = [s["tokens"] / s["tokens_per_s"] for s in steps[4:-1]]
        medians[variant].append(statistics.median(seconds))
        manifest = json.loads((work / "runs" / variant / "run.json").read_text())
        peak = (manifest.get("peak_memory_bytes") or 0) / 2**30
        losses[variant] = [round(s["loss"], 4) for s in steps[:3]] + [round(steps[0]["grad_norm"], 4)]
        print(variant, "round", r, "median step s", round(medians[variant][-1], 4), "spread",
              [round(x, 3) for x in (min(seconds), max(seconds))], f"peak {peak:.3f} GiB", "first losses, grad norm", losses[variant],
              flush=True)
print("medians", {v: [round(x, 4) for x in m] for v, m in medians.items()}, flush=True)
