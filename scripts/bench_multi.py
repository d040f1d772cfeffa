"""Several GPUs, measured (issues 20 and 22): `scripts/bench.py --gpus N` hands its arguments here.

Each case runs the same recipe at 1 GPU and at N GPUs in one invocation, peftctl (`peftctl train --gpus N`) and
the reference (the HF Trainer under `torchrun --nproc-per-node N`, DDP, as users run it), and reports tokens/s of
all ranks together, the scaling ratio N/1, MFU (against N x one GPU's measured matmul rate), every rank's peak
memory (run.json's memory_per_rank; the loop's own peak apart from the model load's) and the memory plan's
per-GPU estimate beside each peak (peftctl/plan/, for the engine and world size of the run).

    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1
    python scripts/bench.py --gpus 2 --cases ddp --out $OUT                  # DDP bf16 LoRA q,k,v,o
    python scripts/bench.py --gpus 2 --cases qlora-ddp --out $OUT            # QLoRA all-linear
    python scripts/bench.py --gpus 2 --cases fsdp --rows-per-gpu 2 --out $OUT   # FSDP2, the same 4 rows a step
    python scripts/bench.py --gpus 2 --cases resume --out $OUT               # SIGTERM, then --resume auto
    python scripts/bench.py --gpus 4 --cases ddp --out $OUT                  # four GPUs
    python scripts/bench.py --gpus 4 --shape 70b --layers 20 --cases fsdp --out $OUT
    python scripts/bench.py --gpus 4 --shape 70b --layers 20 --cases qlora-ddp --sides peftctl --out $OUT
    python scripts/bench.py --gpus 2 --tiny --cases ddp,resume --out /tmp/b  # CPU smoke run (gloo)

Cases: ddp (case 1 of BENCHMARKS.md: bf16 LoRA r16 q,k,v,o, 4 x 2048 rows per GPU), qlora-ddp (case 3: QLoRA nf4
all-linear), fsdp (case 1's recipe with training.distributed: fsdp; peftctl only: the reference is DDP), resume
(case 1 under DDP at N: an uninterrupted run, a run whose launcher gets SIGTERM after --stop-after steps, and
`--resume auto` at N; the losses of the resumed steps against the uninterrupted run's, max abs difference).
--rows-per-gpu R changes the rows each GPU takes per step at N GPUs (default: the case's, the same as one GPU's
run: weak scaling); `--rows-per-gpu 2` at 2 GPUs keeps one GPU's global batch of 4 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import bench
from bench import CASES, GIB, LLAMA3_8B, SCRIPTS, TINY, Case, Context, Shape, log, run_process

# Llama-3-70B (tests/data/configs/llama-3-70b); --layers K keeps K of its 80 decoder layers (build, save and load
# of the whole model do not fit one 10-minute command, and the whole bf16 model does not fit one H200 to build)
LLAMA3_70B = Shape("Llama-3-70B shape, random bf16 weights", dict(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False), max_length=2048, dtype="bfloat16", init_std=0.02, matmul_size=8192, warmup=2,
    timed=6)
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "tiny": TINY}
DEFAULT_LAYERS = {"70b": 20}


@dataclass(frozen=True)
class MultiCase:
    name: str
    title: str
    base: Case  # the BENCHMARKS.md case: model, method, rows per GPU
    engine: str  # training.distributed at N GPUs
    kind: str = "scaling"  # scaling | resume
    reference: bool = True  # the reference side runs (DDP under torchrun)
    scaling_target: dict | None = None  # GPUs -> N-GPU tokens/s over 1-GPU, at least (peftctl)
    peak_fraction_target: float | None = None  # per-GPU loop peak over the 1-GPU loop peak, at most


MULTI_CASES = {
    "ddp": MultiCase("ddp", "DDP, bf16 LoRA q,k,v,o, 4 x 2048 per GPU", CASES[1], "ddp",
                     scaling_target={2: 1.9, 4: 3.7}),
    "qlora-ddp": MultiCase("qlora-ddp", "DDP, QLoRA nf4 all-linear, 4 x 2048 per GPU", CASES[3], "ddp"),
    "fsdp": MultiCase("fsdp", "FSDP2, bf16 LoRA q,k,v,o", CASES[1], "fsdp", reference=False,
                      scaling_target={2: 1.6}, peak_fraction_target=0.6),
    "resume": MultiCase("resume", "DDP, bf16 LoRA q,k,v,o: SIGTERM to the launcher, --resume auto", CASES[1], "ddp",
                        kind="resume", reference=False),
}
PLAN_TOLERANCE = 0.15  # the plan within 15% of each measured peak (BENCHMARKS.md's multi-GPU targets)


# --- arguments ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py --gpus N", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--gpus", type=int, required=True, help="N: the GPUs of the N-GPU runs (2 or more)")
    parser.add_argument("--cases", default="ddp", help=f"comma-separated: {', '.join(MULTI_CASES)}")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--tiny", action="store_true", help="--shape tiny: the CPU smoke run (gloo)")
    parser.add_argument("--layers", type=int, default=None, help="keep K decoder layers (70b default 20)")
    parser.add_argument("--rows-per-gpu", type=int, default=None, help="rows per GPU per step at N GPUs "
                        "(default: the case's, as at one GPU)")
    parser.add_argument("--no-single", action="store_true", help="skip the 1-GPU runs (a base too large for one)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    parser.add_argument("--stop-after", type=int, default=None, help="resume: SIGTERM after this step's line "
                        "(default: a quarter of the steps, at least 2)")
    parser.add_argument("--sides", default="peftctl,reference", help="which sides to run")
    parser.add_argument("--out", default=None, help="report folder (default $OUT, else TMPDIR/peftctl-bench)")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs (default: temporary); "
                        "a model already built there for the same shape is reused")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--budget-s", type=float, default=570, help="stop starting work after this many seconds")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds one training process may take")
    parser.add_argument("--worker", choices=["prepare", "matmul", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--plan-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
    if args.gpus < 2:
        parser.error("--gpus: 2 or more (one GPU: scripts/bench.py without --gpus)")
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_list or any(c not in MULTI_CASES for c in args.case_list):
        parser.error(f"--cases {args.cases}: choose among {', '.join(MULTI_CASES)}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or not set(args.sides) <= {"peftctl", "reference"}:
        parser.error("--sides: peftctl, reference or both")
    args.layers = args.layers if args.layers is not None else DEFAULT_LAYERS.get(args.shape)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers: at least 1")
    shape = make_shape(args.shape, args.layers)
    args.steps = shape.timed if args.steps is None else args.steps
    args.warmup = shape.warmup if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or (args.rows_per_gpu is not None and args.rows_per_gpu < 1):
        parser.error("--steps and --rows-per-gpu must be at least 1, --warmup at least 0")
    return args


def make_shape(name: str, layers: int | None) -> Shape:
    shape = SHAPES[name]
    if layers is None or layers == shape.config["num_hidden_layers"]:
        return shape
    return replace(shape, name=f"{shape.name}, {layers} of {shape.config['num_hidden_layers']} layers",
                   config={**shape.config, "num_hidden_layers": layers})


# --- runs ---------------------------------------------------------------------------------------------------


def recipe_for(ctx: Context, case: MultiCase, data: Path, run_dir: Path, steps: int, gpus: int) -> dict:
    """The BENCHMARKS.md recipe for the case; at N GPUs with the case's engine and the rows per GPU asked for."""
    recipe = bench.peftctl_recipe(case.base, ctx.shape, ctx.model_dir, data, run_dir, steps)
    if gpus > 1:
        recipe["training"]["distributed"] = case.engine
        if ctx.args.rows_per_gpu:
            recipe["training"]["micro_batch_size"] = ctx.args.rows_per_gpu
    return recipe


STAMP = time.strftime("%Y%m%d-%H%M%S")


def run_folder(ctx: Context, label: str) -> Path:
    """This invocation's output.dir for a run: a reused --work keeps earlier runs, which peftctl would not
    overwrite (and this harness does not delete)."""
    return ctx.work / f"runs-{STAMP}" / label


def rows_per_gpu(ctx: Context, case: MultiCase, gpus: int) -> int:
    return (ctx.args.rows_per_gpu or case.base.rows_per_step) if gpus > 1 else case.base.rows_per_step


def run_peftctl(ctx: Context, label: str, recipe: dict, gpus: int, *, extra: tuple = (), stop_after=None) -> dict:
    """`peftctl train RECIPE [--gpus N] --log-format json --quiet`; steps from its JSON lines (tokens: all ranks'),
    memory from its run.json. stop_after: SIGTERM to the launcher once that step's line has arrived."""
    recipe_path = ctx.work / f"{label}.yaml"
    run_dir = Path(recipe["output"]["dir"])
    if not extra:  # a fresh run (a resume reuses the recipe and the folder)
        bench.write_recipe(recipe_path, recipe, label)
    records, proc_box, signalled = [], [], {}

    def on_line(arrived: float, line: str) -> None:
        record = bench.step_record(line)
        if record is not None:
            records.append({**record, "arrived": arrived})
            log(f"{label}: step {record['step']}, {record['tokens']} tokens, {record['tokens_per_s']:,.0f} tok/s, "
                f"loss {record.get('loss', float('nan')):.4f}")
            if stop_after is not None and record["step"] >= stop_after and not signalled and proc_box:
                os.kill(proc_box[0].pid, signal.SIGTERM)  # the launcher this harness started, by its id
                signalled.update(step=record["step"], at=time.perf_counter())
                log(f"{label}: SIGTERM to the launcher (pid {proc_box[0].pid}) after step {record['step']}")

    cmd = [sys.executable, "-m", "peftctl", "train", str(recipe_path), *extra, "--log-format", "json", "--quiet"]
    if gpus > 1:
        cmd[5:5] = ["--gpus", str(gpus)]
    log(f"{label}: {' '.join(cmd[1:])}")
    outcome = run_process(label, cmd, work=ctx.work, logs=ctx.logs, timeout=ctx.timeout(ctx.args.run_timeout),
                          on_line=on_line, on_start=proc_box.append)
    manifest = _read_json(run_dir / "run.json")
    keep = ctx.out / "runs" / label
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "metrics.jsonl", "recipe.yaml"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, keep / name)
    steps = []
    for i, r in enumerate(records):
        previous = records[i - 1]["arrived"] if i else outcome.launched
        steps.append({"step": r["step"], "tokens": r["tokens"], "seconds": r["tokens"] / max(r["tokens_per_s"], 1e-9),
                      "arrival_s": r["arrived"] - previous, "loss": r.get("loss")})
    memory = manifest.get("memory_per_rank") or (
        [{"rank": 0, "peak_memory_bytes": manifest.get("peak_memory_bytes")}] if manifest else [])
    return {"side": "peftctl", "gpus": gpus, "returncode": outcome.returncode, "timed_out": outcome.timed_out,
            "status": "completed" if outcome.returncode == 0 and steps else (
                "timed out" if outcome.timed_out else f"exit {outcome.returncode}"),
            "steps": steps, "memory_per_rank": memory, "distributed": manifest.get("distributed"),
            "world_size": manifest.get("world_size"), "gradient_checkpointing": manifest.get("gradient_checkpointing"),
            "run_status": manifest.get("status"), "steps_done": manifest.get("steps_done"),
            "rows_per_gpu": recipe["training"]["micro_batch_size"], "signalled": signalled or None,
            "total_s": round(outcome.seconds, 1),
            "run_dir": str(run_dir), "log": str(outcome.log_path)}


def run_reference(ctx: Context, label: str, case: MultiCase, data: Path, steps: int, gpus: int) -> dict:
    """bench_reference.py in one process, or under torchrun with N ranks (DDP)."""
    result_path = ctx.work / f"{label}.result.json"
    result_path.unlink(missing_ok=True)
    spec = {"case": label, "model": ctx.model_dir, "data": str(data), "quantized": case.base.quantized,
            "targets": case.base.targets, **bench.LORA, "batch_size": rows_per_gpu(ctx, case, gpus),
            "max_steps": steps, "learning_rate": bench.LEARNING_RATE, "seed": bench.SEED,
            "warmup_steps": ctx.args.warmup, "target_window_tokens": None,
            "output_dir": str(ctx.work / f"trainer-{label}"), "result": str(result_path), "launched_at": time.time()}
    spec_path = ctx.work / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    script = str(SCRIPTS / "bench_reference.py")
    cmd = [sys.executable, script, str(spec_path)]
    if gpus > 1:  # torchrun, as users run it (--standalone: a free port on this host)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), script,
               str(spec_path)]
    log(f"{label}: {' '.join(cmd[1:])}")
    outcome = run_process(label, cmd, work=ctx.work, logs=ctx.logs, timeout=ctx.timeout(ctx.args.run_timeout),
                          on_line=lambda _t, line: log(line))
    result = _read_json(result_path) or {"steps": []}
    result.update(side="reference", gpus=gpus, rows_per_gpu=spec["batch_size"], total_s=round(outcome.seconds, 1),
                  log=str(outcome.log_path),
                  status="completed" if outcome.returncode == 0 and result.get("steps") else (
                      "timed out" if outcome.timed_out else f"exit {outcome.returncode}"))
    result.setdefault("memory_per_rank", [{"rank": 0, "peak_memory_bytes": result.get("peak_memory_bytes")}])
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --- cases --------------------------------------------------------------------------------------------------


def case_data(ctx: Context, case: MultiCase, steps: int) -> Path:
    """Fixed-length rows, enough for `steps` steps at N GPUs (the 1-GPU runs read the same file)."""
    rows = max(rows_per_gpu(ctx, case, ctx.args.gpus), case.base.rows_per_step) * ctx.args.gpus * steps
    data = ctx.work / f"{case.name}.jsonl"
    bench.write_dataset(data, [ctx.shape.max_length] * rows, ctx.shape.config["vocab_size"], seed=7)
    return data


def run_scaling(ctx: Context, case: MultiCase, entry: dict) -> None:
    args, n = ctx.args, ctx.args.gpus
    steps = args.warmup + args.steps
    data = case_data(ctx, case, steps)
    plan = []
    for gpus in ([] if args.no_single else [1]) + [n]:
        if "peftctl" in args.sides:
            label = f"{case.name}-peftctl-{gpus}gpu"
            recipe = recipe_for(ctx, case, data, run_folder(ctx, label), steps, gpus)
            side = run_peftctl(ctx, label, recipe, gpus)
            entry["runs"][label] = finish_side(ctx, side, entry)
            plan.append((label, ctx.work / f"{label}.yaml", gpus, case.engine if gpus > 1 else None,
                         side.get("gradient_checkpointing")))
            write_report(ctx)
        if "reference" in args.sides and case.reference:
            label = f"{case.name}-reference-{gpus}gpu"
            entry["runs"][label] = finish_side(ctx, run_reference(ctx, label, case, data, steps, gpus), entry)
            write_report(ctx)
    attach_plans(ctx, entry, plan)
    entry["verdict"] = scaling_verdict(ctx, case, entry)


def finish_side(ctx: Context, side: dict, entry: dict) -> dict:
    """tokens/s (all ranks, median of the timed steps), MFU against the GPUs' matmul rate."""
    summary = bench.summarise(side.get("steps") or [], ctx.args.warmup, variable=False)
    side["summary"] = summary
    rate = summary.get("tokens_per_s")
    side["mfu"] = rate * entry["flops_per_token"] / (side["gpus"] * ctx.flops) if rate and ctx.flops else None
    return side


def attach_plans(ctx: Context, entry: dict, plans: list) -> None:
    """The memory plan's per-GPU peak for each peftctl run (its engine, world size and checkpointing), in one
    worker process (it builds meta models only)."""
    if not plans:
        return
    spec = [{"label": label, "recipe": str(path), "gpus": gpus, "engine": engine, "checkpointing": ckpt}
            for label, path, gpus, engine, ckpt in plans]
    spec_path = ctx.work / f"plan-{entry['name']}.json"
    spec_path.write_text(json.dumps(spec))
    outcome = run_process(f"plan-{entry['name']}", [sys.executable, str(Path(__file__).resolve()), "--gpus", "2",
                                                    "--worker", "plan", "--plan-spec", str(spec_path)],
                          work=ctx.work, logs=ctx.logs, timeout=ctx.timeout(180))
    planned = _read_json(spec_path.with_suffix(".out.json")) if outcome.returncode == 0 else {}
    for label, *_ in plans:
        run = entry["runs"].get(label)
        if run is None or label not in planned:
            continue
        run["plan"] = planned[label]
        for rank in run.get("memory_per_rank", []):
            measured = rank.get("loop_peak_memory_bytes") or rank.get("peak_memory_bytes")
            if measured:
                rank["plan_error"] = planned[label]["peak_bytes"] / measured - 1


def worker_plan(spec_path: Path) -> int:
    from peftctl.plan import Card, plan_memory
    from peftctl.recipe.loader import load_recipe

    out = {}
    for item in json.loads(spec_path.read_text()):
        recipe = load_recipe(item["recipe"]).recipe
        plan = plan_memory(recipe, card=Card(None, "not checked"), checkpointing=item["checkpointing"],
                           world_size=item["gpus"], engine=item["engine"])
        out[item["label"]] = {"peak_bytes": plan.peak, "description": plan.setting.describe(),
                              "components": {c.name: c.bytes for c in plan.components}}
    spec_path.with_suffix(".out.json").write_text(json.dumps(out, indent=2))
    return 0


def scaling_verdict(ctx: Context, case: MultiCase, entry: dict) -> dict:
    n, runs = ctx.args.gpus, entry["runs"]
    out = {"flags": [], "scaling": {}, "vs_reference": {}}
    for side in ("peftctl", "reference"):
        one, many = (_rate(runs.get(f"{case.name}-{side}-{g}gpu")) for g in (1, n))
        if one and many:
            out["scaling"][side] = many / one
    for g in (1, n):
        pf, ref = _rate(runs.get(f"{case.name}-peftctl-{g}gpu")), _rate(runs.get(f"{case.name}-reference-{g}gpu"))
        if pf and ref:
            out["vs_reference"][str(g)] = pf / ref
    target = (case.scaling_target or {}).get(n)
    if target is not None and "peftctl" in out["scaling"]:
        out["scaling_target"] = target
        out["scaling_met"] = out["scaling"]["peftctl"] >= target
        if not out["scaling_met"]:
            out["flags"].append(f"peftctl scales {out['scaling']['peftctl']:.2f}x at {n} GPUs (target {target}x)")
    one_peak = _loop_peak(runs.get(f"{case.name}-peftctl-1gpu"))
    many = runs.get(f"{case.name}-peftctl-{n}gpu") or {}
    many_peak = max((_loop_peak_rank(r) or 0 for r in many.get("memory_per_rank", [])), default=0) or None
    if one_peak and many_peak:
        out["peak_fraction"] = many_peak / one_peak
        if case.peak_fraction_target is not None and ctx.shape is not TINY:
            out["peak_fraction_met"] = out["peak_fraction"] <= case.peak_fraction_target
            if not out["peak_fraction_met"]:
                out["flags"].append(f"per-GPU peak {out['peak_fraction']:.2f}x one GPU's (target at most "
                                    f"{case.peak_fraction_target}x; rows per GPU {many.get('rows_per_gpu')})")
    for label, run in runs.items():
        if run.get("status") != "completed":
            out["flags"].append(f"{label}: {run.get('status')}")
        for rank in run.get("memory_per_rank", []):
            error = rank.get("plan_error")
            if error is not None and abs(error) > PLAN_TOLERANCE and ctx.shape is not TINY:
                out["flags"].append(f"{label} rank {rank['rank']}: the plan is {error:+.0%} off the measured peak")
    return out


def _rate(run: dict | None) -> float | None:
    return ((run or {}).get("summary") or {}).get("tokens_per_s")


def _loop_peak_rank(rank: dict) -> int | None:
    return rank.get("loop_peak_memory_bytes") or rank.get("peak_memory_bytes")


def _loop_peak(run: dict | None) -> int | None:
    ranks = (run or {}).get("memory_per_rank") or []
    return _loop_peak_rank(ranks[0]) if ranks else None


def run_resume(ctx: Context, case: MultiCase, entry: dict) -> None:
    """An uninterrupted run at N; the same run with SIGTERM to its launcher after --stop-after steps; then
    `--resume auto` at N. The resumed steps' losses against the uninterrupted run's."""
    args, n = ctx.args, ctx.args.gpus
    steps = args.warmup + args.steps
    stop_after = args.stop_after or max(2, steps // 4)
    data = case_data(ctx, case, steps)
    whole = run_peftctl(ctx, "resume-whole", recipe_for(ctx, case, data, run_folder(ctx, "resume-whole"), steps,
                                                        n), n)
    entry["runs"]["resume-whole"] = finish_side(ctx, whole, entry)
    write_report(ctx)
    recipe = recipe_for(ctx, case, data, run_folder(ctx, "resume-cut"), steps, n)
    cut = run_peftctl(ctx, "resume-cut", recipe, n, stop_after=stop_after)
    entry["runs"]["resume-cut"] = cut
    write_report(ctx)
    out = {"stop_after": stop_after, "steps": steps, "flags": [], "stopped_exit_code": cut["returncode"],
           "stopped_status": cut["run_status"], "stopped_at_step": cut["steps_done"]}
    entry["verdict"] = out
    if cut["returncode"] != 143 or cut["run_status"] != "stopped":
        out["flags"].append(f"the signalled run ended with exit {cut['returncode']} and status {cut['run_status']} "
                            "(expected 143, stopped; with too few steps it can finish first: raise --steps)")
        return
    resumed = run_peftctl(ctx, "resume-cut", recipe, n, extra=("--resume", "auto"))
    entry["runs"]["resume-resumed"] = finish_side(ctx, resumed, entry)
    out["resumed_exit_code"] = resumed["returncode"]
    reference = {r["step"]: r["loss"] for r in _metrics(Path(whole["run_dir"]))}
    got = {r["step"]: r["loss"] for r in _metrics(Path(resumed["run_dir"]))}
    compared = sorted(s for s in got if s > cut["steps_done"] and s in reference)
    out["resumed_steps"] = compared
    out["losses"] = {str(s): {"uninterrupted": reference[s], "resumed": got[s]} for s in compared}
    out["max_abs_loss_diff"] = max((abs(reference[s] - got[s]) for s in compared), default=None)
    out["steps_after_resume"] = len(compared)
    if resumed["returncode"] != 0 or len(compared) != steps - cut["steps_done"]:
        out["flags"].append(f"the resumed run: exit {resumed['returncode']}, {len(compared)} of "
                            f"{steps - cut['steps_done']} steps compared")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "loss" in r]


# --- report -------------------------------------------------------------------------------------------------


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def markdown(report: dict) -> str:
    env, matmul = report.get("environment") or {}, report.get("matmul") or {}
    tflops = f"{matmul['flops'] / 1e12:.0f}" if matmul.get("flops") else "-"
    lines = [f"Run {report['started_at']} on {report['gpus']} x {env.get('gpu') or 'CPU'} ({report['shape']}); "
             f"matmul {tflops} TFLOP/s per GPU.", "",
             "| case | run | GPUs | rows/GPU | tok/s (all ranks) | scaling | MFU % | peak GiB per rank (loop) | "
             "plan GiB per GPU | plan error |", "|" + " --- |" * 10]
    for name, entry in report["cases"].items():
        v = entry.get("verdict") or {}
        for label, run in entry.get("runs", {}).items():
            side = run.get("side", "peftctl")
            scaling = v.get("scaling", {}).get(side) if run.get("gpus", 1) > 1 else None
            peaks = ", ".join(_gib(_loop_peak_rank(r)) for r in run.get("memory_per_rank", [])) or "-"
            errors = ", ".join(f"{r['plan_error']:+.0%}" for r in run.get("memory_per_rank", [])
                               if r.get("plan_error") is not None) or "-"
            rate, mfu = (run.get("summary") or {}).get("tokens_per_s"), run.get("mfu")
            cells = [name, label, run.get("gpus"), run.get("rows_per_gpu", "-"), _fmt(rate, ",.0f"),
                     _fmt(scaling, ".2f", "x"), _fmt(None if mfu is None else 100 * mfu, ".1f"), peaks,
                     _gib((run.get("plan") or {}).get("peak_bytes")), errors]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for name, entry in report["cases"].items():
        v = entry.get("verdict") or {}
        if "max_abs_loss_diff" in v or "stopped_exit_code" in v:
            diff = v.get("max_abs_loss_diff")
            lines += ["", f"{name}: SIGTERM after step {v['stop_after']} -> exit {v['stopped_exit_code']}, stopped at "
                      f"step {v.get('stopped_at_step')}; --resume auto -> exit {v.get('resumed_exit_code')}; "
                      f"{v.get('steps_after_resume', 0)} resumed steps, max |loss - uninterrupted| "
                      f"{'-' if diff is None else f'{diff:.3g}'}"]
        if v.get("peak_fraction") is not None:
            lines += ["", f"{name}: per-GPU loop peak at {report['gpus']} GPUs / one GPU's: {v['peak_fraction']:.2f}"]
        lines += [f"- {name}: FLAG {flag}" for flag in v.get("flags", [])]
    return "\n".join(lines) + "\n"


def write_report(ctx: Context) -> None:
    ctx.report["elapsed_s"] = round(time.perf_counter() - bench.T0, 1)
    (ctx.out / "bench.json").write_text(json.dumps(ctx.report, indent=2, default=str) + "\n")
    (ctx.out / "bench.md").write_text(markdown(ctx.report))


# --- main ---------------------------------------------------------------------------------------------------


def prepare_model(ctx: Context) -> bool:
    """Build the model (bench.worker_prepare in its own process), unless --work holds one of this shape."""
    marker = ctx.work / "shape.json"
    wanted = {"name": ctx.shape.name, "config": ctx.shape.config}
    if _read_json(marker).get("shape") == wanted and (ctx.work / "prepare.json").exists():
        prepared = _read_json(ctx.work / "prepare.json")
        log(f"model: reusing {prepared['model_dir']} ({ctx.shape.name})")
    else:
        log(f"model: building it ({ctx.shape.name}) with random weights and saving it with its tokenizer")
        outcome = run_process("prepare", worker_command(ctx) + ["--worker", "prepare"], work=ctx.work, logs=ctx.logs,
                              timeout=ctx.timeout(420))
        if outcome.returncode != 0:
            return False
        prepared = _read_json(ctx.work / "prepare.json")
        marker.write_text(json.dumps({"shape": wanted}))
    ctx.model_dir = prepared["model_dir"]
    ctx.report["model"] = prepared
    outcome = run_process("matmul", worker_command(ctx) + ["--worker", "matmul"], work=ctx.work, logs=ctx.logs,
                          timeout=ctx.timeout(120))
    if outcome.returncode == 0:
        matmul = _read_json(ctx.work / "matmul.json")
        ctx.flops = matmul["flops"]
        ctx.report["environment"] = {k: matmul.pop(k) for k in ("python", "cuda", "gpu", "gpu_memory_gib",
                                                                 "versions")}
        ctx.report["matmul"] = matmul
    return True


def worker_command(ctx: Context) -> list[str]:
    a = ctx.args
    return [sys.executable, str(Path(__file__).resolve()), "--gpus", str(a.gpus), "--shape", a.shape, "--work",
            str(ctx.work)] + (["--layers", str(a.layers)] if a.layers is not None else [])


def run_worker(args: argparse.Namespace) -> int:
    if args.worker == "plan":
        return worker_plan(Path(args.plan_spec))
    shape, work = make_shape(args.shape, args.layers), Path(args.work)
    result = bench.worker_prepare(work, shape) if args.worker == "prepare" else bench.worker_matmul(shape)
    (work / f"{args.worker}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return run_worker(args)
    shape = make_shape(args.shape, args.layers)
    out = Path(args.out or os.environ.get("OUT") or Path(tempfile.gettempdir()) / "peftctl-bench").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    made_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="peftctl-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, shape, work, out, out / "logs", deadline=bench.T0 + args.budget_s)
    ctx.report = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
                  "gpus": args.gpus, "shape": shape.name, "shape_config": shape.config, "layers": args.layers,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "sides": args.sides,
                  "rows_per_gpu": args.rows_per_gpu, "cases": {}, "matmul": None, "environment": None}
    log(f"bench --gpus {args.gpus}: cases {args.case_list}, {shape.name}; work {work}; report {out}")
    try:
        if not prepare_model(ctx):
            log("model: could not be prepared; nothing to measure")
            return 1
        failed = False
        for name in args.case_list:
            case = MULTI_CASES[name]
            entry = {"name": name, "title": case.title, "engine": case.engine, "gpus": args.gpus, "runs": {},
                     "flops_per_token": bench.flops_per_token(
                         bench.flop_model(shape.config, case.base.targets, bench.LORA["r"]), [shape.max_length])}
            ctx.report["cases"][name] = entry
            if ctx.out_of_time(90):
                entry["skipped"] = "time budget"
                failed = True
                continue
            (run_resume if case.kind == "resume" else run_scaling)(ctx, case, entry)
            failed = failed or any(r.get("status") != "completed" for r in entry["runs"].values()
                                   if r is not entry["runs"].get("resume-cut"))
            failed = failed or bool(entry["verdict"].get("flags")) and case.kind == "resume"
            write_report(ctx)
        print(markdown(ctx.report), flush=True)
        log(f"bench: done; report in {out / 'bench.json'} and {out / 'bench.md'}")
        return 1 if failed else 0
    finally:
        write_report(ctx)
        if made_work and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
