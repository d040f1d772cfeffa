"""Side-by-side training benchmark (BENCHMARKS.md): peftctl against the plain HF Trainer + peft reference, one GPU.

    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1; python scripts/bench.py --cases 1,2 --out $OUT
    export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1; python scripts/bench.py --cases 3,4 --out $OUT
    python scripts/bench.py --cases 1 --tiny --out /tmp/bench        # CPU smoke run on a tiny model (the tests)
    python scripts/bench.py --gpus 2 --cases ddp --out $OUT          # 1 and 2 GPUs: scripts/bench_multi.py

Cases (both sides: same model, data, optimiser and LoRA settings; BENCHMARKS.md has the method):
  1  bf16 LoRA r16 on q,k,v,o, 4 x 2048 tokens of fixed length
  2  the same on SFT-like lengths (log-normal, median ~330, cap 2048): the reference takes 8 examples a step
     padded to the longest; peftctl gets the same examples with a user's defaults (packed rows of 2048)
  3  QLoRA nf4 (double quant, bf16 compute) on all linear layers, 4 x 2048
  4  QLoRA at 1 x 2048 with gradient checkpointing on (peftctl: training.gradient_checkpointing: true), for memory

Every heavy step runs in its own process, so that each peak memory is that configuration's alone: the model is
built once (Llama-3-8B shape, random bf16 weights, with a word-level tokenizer) and saved to a temporary folder;
the bf16 matrix-multiply rate is measured for MFU; the correctness gates run (scripts/bench_gates.py); then each
case runs peftctl (`python -m peftctl train RECIPE --log-format json --quiet`) and the reference
(scripts/bench_reference.py). Progress lines carry timestamps; the JSON report (OUT/bench.json) and the tables
(OUT/bench.md) are rewritten after every step, so a run cut short still leaves what it measured. The exit code is
1 when a gate fails or a run fails, else 0; missed targets and baseline misses are flagged in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
GIB = 1 << 30

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
SEED = 42
SFT_MEDIAN, SFT_SIGMA = 330, 1.0  # log-normal token lengths (at max_length 2048; scaled for --tiny)
AGREEMENT = 0.05  # peftctl's own step timer against the arrival times of its JSON lines


@dataclass(frozen=True)
class Case:
    number: int
    title: str
    quantized: bool
    targets: object  # list of module names, or "all-linear"
    rows_per_step: int  # peftctl's micro_batch_size (rows of max_length), gradient_accumulation 1
    reference_batch: int  # the reference's per_device_train_batch_size
    lengths: str  # "fixed" (every example max_length tokens) or "sft" (log-normal)
    checkpointing: object = "auto"  # peftctl's training.gradient_checkpointing; the reference always checkpoints
    target_ratio: float = 1.0  # peftctl tokens/s over the reference's, at least
    max_peak_gib: float | None = None  # peftctl's peak memory, at most
    baseline: tuple[float, float] = (0.0, 0.0)  # the reference figures in BENCHMARKS.md: tokens/s, peak GiB (one H200)


# The targets are issue 21's (the second round; issue 8's first round asked 1.7x, 4.5x, 2.3x, and 1.15x at 7 GiB).
CASES = {
    1: Case(1, "bf16 LoRA q,k,v,o, 4 x 2048 fixed", False, QKVO, 4, 4, "fixed",
            target_ratio=1.95, baseline=(9198, 29.0)),
    2: Case(2, "bf16 LoRA q,k,v,o, SFT-like lengths (real tokens)", False, QKVO, 4, 8, "sft",
            target_ratio=5.5, baseline=(2376, 38.6)),
    3: Case(3, "QLoRA nf4 all-linear, 4 x 2048", True, "all-linear", 4, 4, "fixed",
            target_ratio=2.6, baseline=(5924, 24.7)),
    4: Case(4, "QLoRA nf4 all-linear, 1 x 2048, checkpointing on", True, "all-linear", 1, 1, "fixed",
            checkpointing=True, target_ratio=1.25, max_peak_gib=6.0, baseline=(2888, 12.75)),
}
BASELINE_TOLERANCE = 0.10


@dataclass(frozen=True)
class Shape:
    name: str
    config: dict
    max_length: int
    dtype: str  # weights of the saved model, and the recipe's model.dtype
    init_std: float
    matmul_size: int
    warmup: int
    timed: int


LLAMA3_8B = Shape("Llama-3-8B shape, random bf16 weights", dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False), max_length=2048, dtype="bfloat16", init_std=0.02, matmul_size=8192, warmup=3,
    timed=8)
# The tiny model's weights are wider than the usual 0.02 so that the packing gate can see cross-example leaks.
TINY = Shape("tiny llama (CPU smoke test)", dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False), max_length=128, dtype="float32", init_std=0.2, matmul_size=512, warmup=1, timed=2)

N_SPECIAL = 256  # as Llama 3: the last 256 ids are special tokens
GATE_FRACTIONS = (0.2, 0.35, 0.1, 0.3)  # gate examples' lengths, as fractions of max_length (one packed row)


# --- progress and subprocesses ----------------------------------------------------------------------------

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def subprocess_env(work: Path) -> dict:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "datasets-cache"))
    return env


@dataclass
class Outcome:
    returncode: int | None
    seconds: float
    timed_out: bool
    launched: float  # perf_counter at launch
    log_path: Path


def run_process(name: str, cmd: list[str], *, work: Path, logs: Path, timeout: float, on_line=None,
                on_start=None) -> Outcome:
    """Run `cmd` in its own process group; hand each stdout line (with its arrival time) to on_line; stderr and
    stdout go to logs/NAME.log. Killed (the group) after `timeout` seconds. on_start gets the Popen (to signal it)."""
    log_path = logs / f"{name}.log"
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n")
        log_file.flush()
        launched = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(work), stdout=subprocess.PIPE, stderr=log_file,
                                text=True, bufsize=1, start_new_session=True)
        if on_start is not None:
            on_start(proc)
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put((time.perf_counter(), line))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline, timed_out = launched + timeout, False
        while True:
            try:
                item = lines.get(timeout=max(0.05, deadline - time.perf_counter()))
            except queue.Empty:
                item = "timeout" if time.perf_counter() >= deadline else ""
            if item == "timeout":
                timed_out = True
                log(f"{name}: no end after {timeout:.0f} s; stopping it")
                _kill_group(proc)
                break
            if item is None:
                break
            if not item:
                continue
            arrived, line = item
            log_file.write(line)
            log_file.flush()
            if on_line is not None:
                try:
                    on_line(arrived, line.rstrip("\n"))
                except Exception as e:  # noqa: BLE001 - a bad line must not stop the measurement
                    log(f"{name}: could not read a line ({e}): {line[:200]!r}")
        returncode = proc.wait()
    seconds = time.perf_counter() - launched
    if returncode != 0 or timed_out:
        log(f"{name}: {'timed out' if timed_out else f'exit code {returncode}'} after {seconds:.0f} s; last lines "
            f"of {log_path}:")
        for line in tail(log_path, 25):
            print(f"    | {line}", flush=True)
    return Outcome(None if timed_out else returncode, seconds, timed_out, launched, log_path)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this harness started for the process, by its id
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


# --- the model folder: config, random weights, word-level tokenizer --------------------------------------


def llama3_special_tokens() -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + N_SPECIAL - len(named))]


def write_tokenizer(folder: Path, vocab_size: int, model_max_length: int):
    """A word-level tokenizer: ids 0..V-257 are the words "w0", "w1", ...; the last 256 ids are Llama 3's special
    tokens (BOS, EOS, a pad candidate, ...). Words split on whitespace and no BOS is added, so a text of N words
    is exactly N tokens and both sides see the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocab_size - N_SPECIAL
    specials = llama3_special_tokens()
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({token: words + i for i, token in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|reserved_special_token_0|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                        model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def model_config(shape: Shape):
    from transformers import LlamaConfig

    words = shape.config["vocab_size"] - N_SPECIAL
    return LlamaConfig(**shape.config, initializer_range=shape.init_std, bos_token_id=words,
                       eos_token_id=words + 1)


def worker_prepare(work: Path, shape: Shape) -> dict:
    """Build the model with random weights (on the GPU when there is one) and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder = work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, shape.config["vocab_size"], max(8192, shape.config["max_position_embeddings"]))
    config = model_config(shape)
    dtype = getattr(torch, shape.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    built = time.perf_counter() - t0
    model.save_pretrained(str(folder))
    parameters = sum(p.numel() for p in model.parameters())
    del model

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("w1 w22 w333")["input_ids"]
    if ids != [1, 22, 333] or tokenizer.eos_token_id != config.eos_token_id:
        raise RuntimeError(f"the word-level tokenizer does not load back as written: 'w1 w22 w333' -> {ids}, "
                           f"eos {tokenizer.eos_token_id} (expected {config.eos_token_id})")
    return {"model_dir": str(folder), "parameters": parameters, "build_s": round(built, 1),
            "total_s": round(time.perf_counter() - t0, 1), "device": device, "warmed_imports": warm_imports()}


def warm_imports() -> dict:
    """Import every library either side imports, once, before any timed process: the first process to read a
    library's files from a cold disk pays seconds that the next one does not (20.1 s of imports cold against 15.7 s
    warm on the H200 machine), and case 1's peftctl ran first, ahead of its reference. Only the operating system's
    file cache and Python's bytecode are warmed: no compiled GPU kernel, nothing else either side keeps."""
    import compileall
    import importlib

    seconds = {}
    # peftctl's own bytecode, as `pip install` writes it (a checkout run in place compiles it in its first process)
    t = time.perf_counter()
    compileall.compile_dir(str(REPO / "peftctl"), quiet=1)
    compileall.compile_file(str(SCRIPTS / "bench_reference.py"), quiet=1)
    seconds["peftctl bytecode"] = round(time.perf_counter() - t, 2)
    for name in ("datasets", "bitsandbytes", "peft", "accelerate", "transformers.trainer", "liger_kernel.transformers",
                 "triton"):
        t = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing library is the sides' problem, not this warm-up's
            seconds[name] = f"not imported: {type(e).__name__}"
            continue
        seconds[name] = round(time.perf_counter() - t, 2)
    return seconds


def worker_matmul(shape: Shape) -> dict:
    """The matrix-multiply rate MFU is measured against: n^3 matmuls (bf16 on the GPU, float32 on a CPU), median
    of 10 samples of 5 back-to-back products after warm-up, timed with CUDA events."""
    import torch

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    n = shape.matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(10):
        a @ b
    samples, per_sample = [], 5
    for _ in range(10):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(per_sample):
                a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            for _ in range(per_sample):
                a @ b
            seconds = time.perf_counter() - t
        samples.append(2 * n ** 3 * per_sample / seconds)
    return {"flops": statistics.median(samples), "max_flops": max(samples), "size": n,
            "dtype": str(dtype).replace("torch.", ""), **environment()}


def environment() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
           if torch.cuda.is_available() else None, "versions": {}}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets",
                 "tokenizers"):
        try:
            out["versions"][name] = version(name)
        except PackageNotFoundError:
            out["versions"][name] = None
    return out


# --- data and recipes -------------------------------------------------------------------------------------


def example_lengths(case: Case, shape: Shape, steps: int, *, median: float = SFT_MEDIAN, sigma: float = SFT_SIGMA,
                    seed: int = 1234) -> list[int]:
    """Token lengths (EOS included) of the examples peftctl trains on in `steps` steps (one epoch); the reference
    reads the same file. SFT-like: log-normal with this median at max_length 2048 (scaled with max_length) and
    sigma (of the log), capped at max_length, enough tokens to fill the packed rows of `steps` steps."""
    rows = case.rows_per_step * steps
    if case.lengths == "fixed":
        return [shape.max_length] * rows
    rng = random.Random(seed)
    median = median * shape.max_length / 2048
    lengths: list[int] = []
    while sum(lengths) < rows * shape.max_length * 1.02:
        lengths.append(min(shape.max_length, max(8, round(rng.lognormvariate(math.log(median), sigma)))))
    return lengths


def write_dataset(path: Path, lengths: list[int], vocab_size: int, seed: int) -> None:
    """peftctl's completion format, one row per example: {"text": "w17 w4 ..."} of length-1 words (the EOS each
    side appends makes `length` tokens)."""
    rng = random.Random(seed)
    words = vocab_size - N_SPECIAL
    with open(path, "w", encoding="utf-8") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(words)}" for _ in range(n - 1))}) + "\n")


def peftctl_recipe(case: Case, shape: Shape, model_dir: str, data: Path, out_dir: Path, max_steps: int) -> dict:
    """The recipe a user would write for this case: no benchmark-only setting (case 4 asks for checkpointing, as
    its definition says); validation off and checkpoints out of the way of a short measured run."""
    compute = "bfloat16" if shape.dtype == "bfloat16" else "float32"
    recipe = {"model": {"name": model_dir, "dtype": shape.dtype}}
    if case.quantized:
        recipe["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute}
    recipe["method"] = {"name": "qlora" if case.quantized else "lora", **LORA, "targets": case.targets}
    recipe["dataset"] = {"path": str(data), "format": "completion", "validation": 0, "max_length": shape.max_length}
    training = {"max_steps": max_steps, "micro_batch_size": case.rows_per_step, "gradient_accumulation": 1,
                "learning_rate": LEARNING_RATE, "lr_scheduler": "constant", "warmup_steps": 0,
                "save_every": 1_000_000, "seed": SEED}
    if case.checkpointing != "auto":
        training["gradient_checkpointing"] = case.checkpointing
    recipe["training"] = training
    recipe["output"] = {"dir": str(out_dir)}
    return recipe


def write_recipe(path: Path, recipe: dict, title: str) -> None:
    import yaml

    header = f"# bench: {title}. Run: peftctl train {path.name} --log-format json --quiet\n"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


# --- FLOPs and MFU ----------------------------------------------------------------------------------------


def linear_shapes(config: dict) -> dict:
    """(in, out) of each linear layer of one decoder layer, by name."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def flop_model(config: dict, targets, r: int) -> dict:
    """FLOPs per token, split into what does not depend on the example's length and the attention coefficient.

    matmul: 4 N, N = parameters of the decoder's linear layers and the output head (the input embedding is a
      lookup, norms are elementwise): 2 N forward + 2 N for activation gradients; frozen weights get no weight
      gradient. Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
    lora: 6 r (in + out) per adapted layer (forward, input gradient, and the A and B weight gradients).
    attention: 6 * n_layers * d_attn * l per token of an example of l tokens (forward 4 l d per token and layer
      without a mask, halved by causality; backward twice the forward). Padding counts for nothing.
    """
    shapes = linear_shapes(config)
    layers, h, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    n_linear = layers * sum(i * o for i, o in shapes.values()) + h * vocab
    n_total = n_linear + vocab * h + layers * 2 * h + h
    adapted = list(shapes) if targets == "all-linear" else list(targets)
    lora = layers * sum(6 * r * sum(shapes[name]) for name in adapted)
    d_attn = shapes["q_proj"][1]
    return {"parameters": n_total, "parameters_counted": n_linear, "matmul": 4 * n_linear, "lora": lora,
            "attention_per_length": 6 * layers * d_attn}


def flops_per_token(model: dict, lengths: list[int]) -> float:
    """Average FLOPs per real token over examples of these lengths (long examples weigh by their tokens)."""
    tokens = sum(lengths)
    squares = sum(n * n for n in lengths)
    return model["matmul"] + model["lora"] + model["attention_per_length"] * squares / tokens


# --- measurements -----------------------------------------------------------------------------------------


def summarise(steps: list[dict], warmup: int, variable: bool) -> dict:
    """Tokens/s over the steps after warm-up. Fixed lengths: the median of each step's rate. Variable lengths
    (case 2): the window's real tokens over its time, since steps carry unequal numbers of real tokens."""
    timed = steps[warmup:]
    if not timed:
        return {"error": f"only {len(steps)} step(s), none after {warmup} warm-up"}
    rates = [s["tokens"] / s["seconds"] for s in timed if s["seconds"] > 0]
    window_tokens = sum(s["tokens"] for s in timed)
    window_s = sum(s["seconds"] for s in timed)
    median_rate = statistics.median(rates) if rates else 0.0
    window_rate = window_tokens / window_s if window_s > 0 else 0.0
    return {"tokens_per_s": window_rate if variable else median_rate, "statistic": "window" if variable else "median",
            "median_tokens_per_s": median_rate, "window_tokens_per_s": window_rate, "window_tokens": window_tokens,
            "window_s": window_s, "timed_steps": len(timed),
            "spread": (max(rates) - min(rates)) / median_rate if rates and median_rate else None}


@dataclass
class Context:
    args: argparse.Namespace
    shape: Shape
    work: Path
    out: Path
    logs: Path
    model_dir: str = ""
    flops: float | None = None  # measured matmul rate
    report: dict = field(default_factory=dict)
    deadline: float = 0.0

    def timeout(self, cap: float) -> float:
        return max(1.0, min(cap, self.deadline - time.perf_counter()))

    def out_of_time(self, need: float) -> bool:
        return self.deadline - time.perf_counter() < need


def step_record(line: str) -> dict | None:
    """One of peftctl's `--log-format json` lines, when it reports a training step."""
    if not line.startswith("{"):
        return None
    record = json.loads(line)
    return record if "tokens_per_s" in record and "step" in record else None


def triton_cache_entries() -> int:
    """How many entries Triton's on-disk cache holds (TRITON_CACHE_DIR, else ~/.triton/cache): one a compiled
    kernel or launcher. A peftctl launch that adds some compiled them inside its first step (seconds on the H200:
    the first run on a machine, or after an upgrade); later launches find them there. The reference runs no Triton
    kernel."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR")
                  or Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache")
    try:
        return sum(1 for _ in folder.iterdir())
    except OSError:
        return 0


def run_peftctl(ctx: Context, case: Case, data: Path, max_steps: int, tag: str = "") -> dict:
    """One `peftctl train` process; `tag` names a further launch of the same case (its own recipe and run folder)."""
    name = f"case{case.number}{tag}"
    recipe_path = ctx.work / f"{name}.yaml"
    run_dir = ctx.work / "runs" / name
    write_recipe(recipe_path, peftctl_recipe(case, ctx.shape, ctx.model_dir, data, run_dir, max_steps),
                 f"case {case.number}, {case.title}")
    records: list[dict] = []

    def on_line(arrived: float, line: str) -> None:
        record = step_record(line)
        if record is not None:
            records.append({**record, "arrived": arrived})
            log(f"case {case.number} peftctl: step {record['step']}/{max_steps}, {record['tokens']} tokens, "
                f"{record['tokens_per_s']:,.0f} tok/s, loss {record.get('loss', float('nan')):.4f}")

    log(f"case {case.number} peftctl: python -m peftctl train {recipe_path.name} ({max_steps} steps)")
    cached = triton_cache_entries()
    outcome = run_process(f"{name}-peftctl", [sys.executable, "-m", "peftctl", "train", str(recipe_path),
                                              "--log-format", "json", "--quiet"],
                          work=ctx.work, logs=ctx.logs, timeout=ctx.timeout(ctx.args.run_timeout), on_line=on_line)
    manifest = {}
    try:
        manifest = json.loads((run_dir / "run.json").read_text())
        keep = ctx.out / "runs" / f"{name}-peftctl"
        keep.mkdir(parents=True, exist_ok=True)
        for file in ("run.json", "metrics.jsonl", "recipe.yaml"):
            if (run_dir / file).exists():
                shutil.copy(run_dir / file, keep / file)
    except (OSError, json.JSONDecodeError):
        pass
    steps = []
    for i, r in enumerate(records):
        previous = records[i - 1] if i else None
        steps.append({"step": r["step"], "tokens": r["tokens"], "seconds": r["tokens"] / max(r["tokens_per_s"], 1e-9),
                      "arrival_s": r["arrived"] - (previous["arrived"] if previous else outcome.launched),
                      "loss": r.get("loss"), "grad_norm": r.get("grad_norm")})
    timings = manifest.get("timings") or {}
    status = "completed" if outcome.returncode == 0 and steps else (
        "timed out" if outcome.timed_out else f"failed (exit {outcome.returncode})")
    return {"side": "peftctl", "case": case.number, "status": status, "steps": steps,
            "first_step_s": timings.get("first_step_s"),
            "first_step_from_launch_s": (records[0]["arrived"] - outcome.launched) if records else None,
            "setup_phases": timings.get("setup_phases"),  # run.json: seconds per phase before the loop
            "triton_compiled": max(0, triton_cache_entries() - cached),  # new entries in its cache: a cold start
            "peak_memory_bytes": manifest.get("peak_memory_bytes"),
            "first_loss": steps[0]["loss"] if steps else None,
            "first_grad_norm": steps[0]["grad_norm"] if steps else None,
            "gradient_checkpointing": manifest.get("gradient_checkpointing"),
            "packed": (manifest.get("data") or {}).get("packed"), "versions": manifest.get("versions"),
            "error": manifest.get("error"), "total_s": round(outcome.seconds, 1), "log": str(outcome.log_path)}


def run_reference(ctx: Context, case: Case, data: Path, max_steps: int, target_tokens: int | None,
                  tag: str = "") -> dict:
    name = f"case{case.number}{tag}"
    result_path = ctx.work / f"reference-{name}.json"
    spec = {"case": case.number, "model": ctx.model_dir, "data": str(data), "quantized": case.quantized,
            "targets": case.targets, **LORA, "batch_size": case.reference_batch, "max_steps": max_steps,
            "learning_rate": LEARNING_RATE, "seed": SEED, "warmup_steps": ctx.args.warmup,
            "target_window_tokens": target_tokens, "output_dir": str(ctx.work / f"trainer-{name}"),
            "result": str(result_path), "launched_at": time.time()}
    spec_path = ctx.work / f"reference-{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log(f"case {case.number} reference: HF Trainer + peft, batch {case.reference_batch}, up to {max_steps} steps"
        + (f" (until {target_tokens:,} real tokens after warm-up)" if target_tokens else ""))
    outcome = run_process(f"{name}-reference", [sys.executable, str(SCRIPTS / "bench_reference.py"), str(spec_path)],
                          work=ctx.work, logs=ctx.logs, timeout=ctx.timeout(ctx.args.run_timeout),
                          on_line=lambda _t, line: log(line))
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"side": "reference", "case": case.number, "steps": []}
    if outcome.returncode != 0:
        result["status"] = "timed out" if outcome.timed_out else f"failed (exit {outcome.returncode})"
    result.update(log=str(outcome.log_path), total_s=round(outcome.seconds, 1))
    return result


def run_case(ctx: Context, case: Case) -> dict:
    args, shape = ctx.args, ctx.shape
    steps = args.warmup + args.steps
    lengths = example_lengths(case, shape, steps, median=args.sft_median, sigma=args.sft_sigma)
    data = ctx.work / f"case{case.number}.jsonl"
    write_dataset(data, lengths, shape.config["vocab_size"], seed=case.number)
    model = flop_model(shape.config, case.targets, LORA["r"])
    per_token = flops_per_token(model, lengths)
    entry = {"title": case.title, "flops_per_token": per_token, "flop_model": model, "sides": {},
             "data": {"examples": len(lengths), "tokens": sum(lengths), "median_length": statistics.median(lengths),
                      "mean_length": round(sum(lengths) / len(lengths), 1), "at_cap": lengths.count(shape.max_length),
                      "sft_median": args.sft_median, "sft_sigma": args.sft_sigma} if case.lengths != "fixed"
             else {"examples": len(lengths), "tokens": sum(lengths), "length": shape.max_length}}
    ctx.report["cases"][str(case.number)] = entry
    variable = case.lengths != "fixed"

    if "peftctl" in args.sides:
        side = run_peftctl(ctx, case, data, steps)
        side["summary"] = peftctl_summary(side["steps"], args.warmup, variable)
        entry["sides"]["peftctl"] = side
        write_report(ctx)
    if "reference" in args.sides:
        target = None
        if variable:  # the reference's window takes as many real tokens as peftctl's (or as it should have)
            measured = (entry["sides"].get("peftctl", {}).get("summary") or {}).get("window_tokens")
            target = measured or int(args.steps * case.rows_per_step * shape.max_length * 0.98)
        ref_steps = steps if not variable else args.warmup + 4 * args.steps + 4
        side = run_reference(ctx, case, data, ref_steps, target)
        side["summary"] = summarise(side.get("steps") or [], args.warmup, variable)
        entry["sides"]["reference"] = side
        write_report(ctx)
    for side in entry["sides"].values():
        rate = side["summary"].get("tokens_per_s")
        side["mfu"] = rate * per_token / ctx.flops if rate and ctx.flops else None
    entry["verdict"] = verdict(ctx, case, entry)
    write_report(ctx)
    if args.startup_repeats and {"peftctl", "reference"} <= set(entry["sides"]):
        entry["startup"] = run_startup(ctx, case, data, entry)
        write_report(ctx)
    return entry


def run_startup(ctx: Context, case: Case, data: Path, entry: dict) -> dict:
    """Launch to the first step, measured again: `--startup-repeats` more launches of each side, one step each,
    taking turns (the reference first in every other round), so that the machine's drift falls on both sides
    alike. One launch a side says little: every process on the H200 machine started 5-9 s slower in one invocation
    than in the next (BENCHMARKS.md)."""
    seconds = {side: [entry["sides"][side].get("first_step_from_launch_s")] for side in ("peftctl", "reference")}
    for k in range(ctx.args.startup_repeats):
        for side in ("peftctl", "reference") if k % 2 else ("reference", "peftctl"):
            if ctx.out_of_time(90):
                log(f"case {case.number}: startup launches stopped, the time budget is spent")
                return startup_summary(seconds)
            tag = f"-startup{k + 1}"
            result = (run_peftctl(ctx, case, data, 1, tag) if side == "peftctl"
                      else run_reference(ctx, case, data, 1, None, tag))
            seconds[side].append(result.get("first_step_from_launch_s"))
            log(f"case {case.number} {side}: launch {k + 2}, first step after "
                f"{_num(seconds[side][-1], '.1f')} s")
    return startup_summary(seconds)


def startup_summary(seconds: dict[str, list[float | None]]) -> dict:
    """Each side's launches and their median (launches that never reached a step left out); met when peftctl's
    median is at most the reference's."""
    medians = {side: statistics.median(v) if (v := [x for x in values if x is not None]) else None
               for side, values in seconds.items()}
    met = None if None in medians.values() else medians["peftctl"] <= medians["reference"]
    return {"seconds": seconds, "median": medians, "met": met}


def peftctl_summary(steps: list[dict], warmup: int, variable: bool) -> dict:
    """peftctl's tokens/s from its own step timer (its JSON lines' tokens_per_s) while that timer agrees with the
    arrival times of the lines; from the arrival times when it does not (then the timer is flagged)."""
    summary = {**summarise(steps, warmup, variable), **_agreement(steps, warmup), "source": "step timer"}
    if summary.get("timer_agrees") is False:
        by_arrival = summarise([{**s, "seconds": s["arrival_s"]} for s in steps], warmup, variable)
        summary.update(tokens_per_s=by_arrival["tokens_per_s"], source="arrival times of the step lines",
                       timer_tokens_per_s=summary["tokens_per_s"])
    return summary


def _agreement(steps: list[dict], warmup: int) -> dict:
    """peftctl's step timer against the arrival times of its JSON lines (each printed after a host sync). They
    disagree when the loop takes its time before the GPU has finished the step. The last step is left out: the
    loop launches a step before it prints the previous one's line, but not past the last, whose line therefore
    follows the one before it by less than a step."""
    timed = steps[max(warmup, 1):-1]  # step 1's line arrives after the process's start-up
    if len(timed) < 2:
        return {}
    arrival = sum(s["tokens"] for s in timed) / sum(s["arrival_s"] for s in timed)
    loop = sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed)
    return {"arrival_tokens_per_s": arrival, "timer_agrees": abs(loop - arrival) <= AGREEMENT * arrival}


def verdict(ctx: Context, case: Case, entry: dict) -> dict:
    sides = entry["sides"]
    ref, pf = sides.get("reference", {}), sides.get("peftctl", {})
    ref_rate = (ref.get("summary") or {}).get("tokens_per_s")
    pf_rate = (pf.get("summary") or {}).get("tokens_per_s")
    out = {"ratio": pf_rate / ref_rate if pf_rate and ref_rate else None, "flags": []}
    if out["ratio"] is not None:
        met = out["ratio"] >= case.target_ratio
        if case.max_peak_gib is not None:
            peak = pf.get("peak_memory_bytes")
            met = met and peak is not None and peak / GIB <= case.max_peak_gib
        out["target_met"] = met
    if ctx.shape is LLAMA3_8B and ref_rate:
        rate_ok = abs(ref_rate / case.baseline[0] - 1) <= BASELINE_TOLERANCE
        peak = ref.get("peak_memory_bytes")
        peak_ok = peak is not None and abs(peak / GIB / case.baseline[1] - 1) <= BASELINE_TOLERANCE
        out["baseline"] = {"tokens_per_s": case.baseline[0], "peak_gib": case.baseline[1],
                           "rate_within": rate_ok, "peak_within": peak_ok}
        if not (rate_ok and peak_ok):
            out["flags"].append(f"reference misses DESIGN.md's baseline ({case.baseline[0]:,.0f} tok/s, "
                                f"{case.baseline[1]} GiB) by more than {BASELINE_TOLERANCE:.0%}")
    for name, side in sides.items():
        if side.get("status") != "completed":
            out["flags"].append(f"{name}: {side.get('status')}")
        grad = side.get("first_grad_norm")
        if grad is not None and not (math.isfinite(grad) and grad > 0):
            out["flags"].append(f"{name}: first step's gradient norm is {grad}")
        if (side.get("summary") or {}).get("timer_agrees") is False:
            out["flags"].append(f"{name}: its step timer and the arrival of its step lines disagree by more than "
                                f"{AGREEMENT:.0%} (is the step time taken after a sync?); tokens/s taken from the "
                                "arrival times")
    if case.lengths != "fixed" and ref_rate and pf_rate:
        a, b = ref["summary"]["window_tokens"], pf["summary"]["window_tokens"]
        if abs(a - b) > 0.15 * b:
            out["flags"].append(f"measured windows hold unequal real tokens: reference {a:,}, peftctl {b:,}")
    return out


# --- gates ------------------------------------------------------------------------------------------------


def run_gates(ctx: Context, case: Case) -> dict:
    lengths = [max(4, int(f * ctx.shape.max_length)) for f in GATE_FRACTIONS]
    data = ctx.work / "gates.jsonl"
    write_dataset(data, lengths, ctx.shape.config["vocab_size"], seed=99)
    recipe_path = ctx.work / "gates.yaml"
    write_recipe(recipe_path, peftctl_recipe(case, ctx.shape, ctx.model_dir, data, ctx.work / "runs" / "gates", 1),
                 f"gates, as case {case.number}")
    result_path = ctx.work / "gates.json"
    spec = {"model": ctx.model_dir, "data": str(data), "recipe": str(recipe_path), "quantized": case.quantized,
            "targets": case.targets, **LORA, "rtol": ctx.args.gate_rtol or (5e-3 if ctx.shape.dtype != "float32"
                                                                            else 1e-4),
            "result": str(result_path)}
    spec_path = ctx.work / "gates.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log(f"gates (as case {case.number}): {len(lengths)} examples of {lengths} tokens")
    outcome = run_process("gates", [sys.executable, str(SCRIPTS / "bench_gates.py"), str(spec_path)], work=ctx.work,
                          logs=ctx.logs, timeout=ctx.timeout(ctx.args.gates_timeout), on_line=lambda _t, s: log(s))
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"status": "failed", "gates": []}
    result["as_case"] = case.number
    if not result.get("gates"):
        result["status"] = "timed out" if outcome.timed_out else f"failed (exit {outcome.returncode})"
    return result


def gates_passed(report: dict) -> bool | None:
    gates = report.get("gates")
    if gates is None:
        return None  # not run (--skip-gates)
    return bool(gates.get("gates")) and all(g["passed"] for g in gates["gates"])


# --- report -----------------------------------------------------------------------------------------------


def _num(value, fmt: str, empty: str = "-") -> str:
    return empty if value is None else format(value, fmt)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for number, entry in report["cases"].items():
        case = CASES[int(number)]
        ref, pf = entry["sides"].get("reference", {}), entry["sides"].get("peftctl", {})
        v = entry.get("verdict") or {}
        target = f">= {case.target_ratio}x" + (f", <= {case.max_peak_gib} GiB" if case.max_peak_gib else "")
        met = {True: "yes", False: "NO"}.get(v.get("target_met"), "-")

        def rate(side):
            return _num((side.get("summary") or {}).get("tokens_per_s"), ",.0f")

        def peak(side):
            value = side.get("peak_memory_bytes")
            return _num(value / GIB if value is not None else None, ".2f")

        def mfu(side):
            return _num(side.get("mfu") * 100 if side.get("mfu") is not None else None, ".1f")

        def first(side):
            return f"{_num(side.get('first_step_s'), '.1f')} / {_num(side.get('first_step_from_launch_s'), '.0f')}"

        rows.append([number, entry["title"], rate(ref), rate(pf), _num(v.get("ratio"), ".2f"), target, met,
                     peak(ref), peak(pf), first(ref), first(pf), mfu(ref), mfu(pf)])
    return rows


HEADER = ["case", "what", "reference tok/s", "peftctl tok/s", "ratio", "target", "met", "reference peak GiB",
          "peftctl peak GiB", "reference first step s (loop / launch)", "peftctl first step s (loop / launch)",
          "reference MFU %", "peftctl MFU %"]


def setup_lines(report: dict) -> list[str]:
    """Each side's launch-to-first-step, phase by phase (peftctl: run.json's timings.setup_phases; the reference:
    bench_reference.py's marks), then the first step, one line a case and side: where the seconds before training
    go."""
    lines = []
    for number, entry in report["cases"].items():
        for name in ("peftctl", "reference"):
            side = entry["sides"].get(name) or {}
            phases = dict(side.get("setup_phases") or {})
            if not phases:
                continue
            if side.get("first_step_s") is not None:
                phases["first step"] = side["first_step_s"]
            total = sum(phases.values())
            parts = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in phases.items())
            compiled = side.get("triton_compiled")
            lines.append(f"case {number} {name} setup (s): {parts}; sum {total:.1f}, launch to first step "
                         f"{_num(side.get('first_step_from_launch_s'), '.1f')}"
                         + (f" (a cold Triton cache: {compiled} entries compiled in this launch)" if compiled else ""))
    for number, entry in report["cases"].items():
        startup = entry.get("startup")
        if startup:
            launches = {side: ", ".join(_num(x, ".1f") for x in values) for side, values in startup["seconds"].items()}
            met = {True: "met", False: "NOT met"}.get(startup["met"], "-")
            lines.append(f"case {number} launch to first step (s), median of each side's launches: reference "
                         f"{_num(startup['median']['reference'], '.1f')} ({launches['reference']}), peftctl "
                         f"{_num(startup['median']['peftctl'], '.1f')} ({launches['peftctl']}): {met}")
    return lines


def markdown(report: dict) -> str:
    env, matmul = report.get("environment") or {}, report.get("matmul") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    tflops = _num(matmul["flops"] / 1e12 if matmul.get("flops") else None, ".0f")
    title = (f"Run {report['started_at']} on {env.get('gpu') or 'CPU'} ({report['shape']}); {versions}; "
             f"matmul {tflops} TFLOP/s ({matmul.get('dtype', '-')}).")
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    setup = setup_lines(report)
    if setup:
        lines += [""] + [f"- {line}" for line in setup]
    gates = report.get("gates")
    if gates:
        lines += ["", f"Gates (as case {gates.get('as_case')}): " + (
            "; ".join(f"{'PASS' if g['passed'] else 'FAIL'}{' (weak)' if g.get('weak') else ''} {g['name']}"
                      for g in gates.get("gates", [])) or gates.get("status", "-"))]
    flags = [f"case {n}: {flag}" for n, e in report["cases"].items()
             for flag in (e.get("verdict") or {}).get("flags", [])]
    if flags:
        lines += [""] + [f"- {flag}" for flag in flags]
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    rows = [HEADER] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for line in setup_lines(report):
        print(line)
    gates = report.get("gates")
    print()
    if gates is None:
        print("gates: not run (--skip-gates)")
    else:
        print(f"gates (as case {gates.get('as_case')}): {gates.get('status')}")
        for g in gates.get("gates", []):
            print(f"  {'PASS' if g['passed'] else 'FAIL'}{' (weak)' if g.get('weak') else ''}  {g['name']}: "
                  f"{g['detail']}")
    for number, entry in report["cases"].items():
        v = entry.get("verdict") or {}
        base = v.get("baseline")
        if base:
            ref = entry["sides"].get("reference", {})
            rate = (ref.get("summary") or {}).get("tokens_per_s")
            peak = (ref.get("peak_memory_bytes") or 0) / GIB
            print(f"case {number} reference vs DESIGN.md: {rate:,.0f} tok/s (baseline {base['tokens_per_s']:,.0f}, "
                  f"{'ok' if base['rate_within'] else 'MISS'}), {peak:.2f} GiB (baseline {base['peak_gib']}, "
                  f"{'ok' if base['peak_within'] else 'MISS'})")
        for flag in v.get("flags", []):
            print(f"case {number}: FLAG {flag}")
    print(flush=True)


def write_report(ctx: Context) -> None:
    ctx.report["elapsed_s"] = round(time.perf_counter() - T0, 1)
    (ctx.out / "bench.json").write_text(json.dumps(ctx.report, indent=2, default=str) + "\n")
    (ctx.out / "bench.md").write_text(markdown(ctx.report))


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", default="1,2", help="comma-separated case numbers (1-4)")
    parser.add_argument("--tiny", action="store_true", help="tiny llama on the CPU: a smoke test of the harness")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 8; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; tiny 1)")
    parser.add_argument("--out", default=None, help="report folder (default $OUT, else TMPDIR/peftctl-bench)")
    parser.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--sides", default="peftctl,reference", help="which sides to run")
    parser.add_argument("--sft-median", type=float, default=SFT_MEDIAN, help="case 2: median example length in "
                        f"tokens at max_length 2048 (default {SFT_MEDIAN})")
    parser.add_argument("--sft-sigma", type=float, default=SFT_SIGMA, help="case 2: sigma of the log of the length "
                        f"(default {SFT_SIGMA})")
    parser.add_argument("--skip-gates", action="store_true")
    parser.add_argument("--startup-repeats", type=int, default=0, help="launch each side this many more times, one "
                        "step each, taking turns, and compare the medians of launch to first step (about 30 s a "
                        "launch on the 8B shape)")
    parser.add_argument("--gate-rtol", type=float, default=None, help="loss tolerance of the gates (default 5e-3 "
                        "in bf16, 1e-4 in float32)")
    parser.add_argument("--budget-s", type=float, default=570, help="stop starting work after this many seconds")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds one training process may take")
    parser.add_argument("--gates-timeout", type=float, default=300)
    parser.add_argument("--worker", choices=["prepare", "matmul"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else LLAMA3_8B
    args.steps = shape.timed if args.steps is None else args.steps
    args.warmup = shape.warmup if args.warmup is None else args.warmup
    try:
        args.case_list = [int(c) for c in args.cases.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--cases {args.cases}: expected numbers like 1,2")
    if not args.case_list or any(c not in CASES for c in args.case_list):
        parser.error(f"--cases {args.cases}: choose among {', '.join(map(str, CASES))}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not set(args.sides) <= {"peftctl", "reference"} or not args.sides:
        parser.error("--sides: peftctl, reference or both")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def run_worker(args: argparse.Namespace) -> int:
    shape = TINY if args.tiny else LLAMA3_8B
    work = Path(args.work)
    result = worker_prepare(work, shape) if args.worker == "prepare" else worker_matmul(shape)
    (work / f"{args.worker}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--gpus" or a.startswith("--gpus=") for a in argv):  # several GPUs: issues 20 and 22
        import bench_multi

        return bench_multi.main(argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    shape = TINY if args.tiny else LLAMA3_8B
    out = Path(args.out or os.environ.get("OUT") or Path(tempfile.gettempdir()) / "peftctl-bench").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    made_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="peftctl-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, shape, work, out, out / "logs", deadline=T0 + args.budget_s)
    ctx.report = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
                  "shape": shape.name, "shape_config": shape.config, "max_length": shape.max_length,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "sides": args.sides,
                  "cases": {}, "gates": None, "matmul": None, "environment": None}
    log(f"bench: cases {args.case_list}, {shape.name}, {args.warmup} warm-up + {args.steps} timed steps; work "
        f"{work}; report {out}")
    try:
        return _run(ctx)
    finally:
        write_report(ctx)
        if made_work and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(ctx: Context) -> int:
    args, shape, work = ctx.args, ctx.shape, ctx.work
    if shape is LLAMA3_8B and shutil.disk_usage(work).free < 20 * GIB:
        log(f"warning: {work} has {shutil.disk_usage(work).free / GIB:.0f} GiB free; the model needs ~16 GiB "
            "(choose another place with --work)")
    worker = [sys.executable, str(Path(__file__).resolve()), "--work", str(work)] + (["--tiny"] if args.tiny else [])

    log("model: building it with random weights and saving it with its tokenizer")
    outcome = run_process("prepare", worker + ["--worker", "prepare"], work=work, logs=ctx.logs,
                          timeout=ctx.timeout(300))
    if outcome.returncode != 0:
        log("model: could not be prepared; nothing to measure")
        return 1
    prepared = json.loads((work / "prepare.json").read_text())
    ctx.model_dir = prepared["model_dir"]
    ctx.report["model"] = prepared
    log(f"model: {prepared['parameters'] / 1e9:.2f}B parameters, built in {prepared['build_s']} s, ready in "
        f"{prepared['total_s']} s; libraries read once (s): {prepared.get('warmed_imports')}")

    outcome = run_process("matmul", worker + ["--worker", "matmul"], work=work, logs=ctx.logs,
                          timeout=ctx.timeout(120))
    if outcome.returncode == 0:
        matmul = json.loads((work / "matmul.json").read_text())
        ctx.flops = matmul["flops"]
        ctx.report["environment"] = {k: matmul.pop(k) for k in ("python", "cuda", "gpu", "gpu_memory_gib",
                                                                 "versions")}
        ctx.report["matmul"] = matmul
        log(f"matmul: {matmul['flops'] / 1e12:.1f} TFLOP/s ({matmul['dtype']} {matmul['size']}^3, median; "
            f"max {matmul['max_flops'] / 1e12:.1f}) on {ctx.report['environment']['gpu'] or 'CPU'}")
    write_report(ctx)

    failed = False
    if not args.skip_gates:
        ctx.report["gates"] = run_gates(ctx, CASES[args.case_list[0]])
        write_report(ctx)
        if not gates_passed(ctx.report):
            failed = True
            log("gates: FAILED (the cases still run, so their numbers are there to look at)")

    for number in args.case_list:
        if ctx.out_of_time(90):
            log(f"case {number}: skipped, the time budget (--budget-s {args.budget_s:.0f}) is spent")
            ctx.report["cases"][str(number)] = {"title": CASES[number].title, "sides": {}, "skipped": "time budget"}
            failed = True
            continue
        entry = run_case(ctx, CASES[number])
        failed = failed or any(side.get("status") != "completed" for side in entry["sides"].values())
    print_table(ctx.report)
    print(markdown(ctx.report))
    log(f"bench: done; report in {ctx.out / 'bench.json'} and {ctx.out / 'bench.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
