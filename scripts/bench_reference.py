"""The reference side of scripts/bench.py: LoRA / QLoRA with the plain Hugging Face Trainer and peft.

Written the way their documentation shows it, and frozen: AutoModelForCausalLM with SDPA (4-bit through
BitsAndBytesConfig, then prepare_model_for_kbit_training), get_peft_model with a LoraConfig, a collator that pads
each batch to its longest example (labels -100 on the padding), TrainingArguments with bf16 and gradient
checkpointing, Trainer.train(). Nothing here is tuned: it is what a user following the docs runs.

What is added only measures: a TrainerCallback that synchronises the GPU at the end of every optimiser step and
timestamps it (a step's time is the interval between two step ends, so it holds everything the Trainer does per
step, data included), the real (non-padding) tokens of each batch as the collator built it, the peak
allocated memory at the end, and the wall clock at the end of each setup phase (`setup_phases`, as peftctl's
run.json has them).

bench.py runs it in its own process, so that peak memory is this run's alone; on several GPUs (bench.py --gpus N,
scripts/bench_multi.py) under torchrun with DDP, as users run the Trainer (each rank's model on its own GPU; a
step's tokens are every rank's, its time rank 0's; every rank's peak is recorded):

    python scripts/bench_reference.py SPEC.json      # SPEC: written by bench.py; RESULT json path inside
    torchrun --nproc-per-node N scripts/bench_reference.py SPEC.json

bench_gates.py imports `build_model`, `tokenize` and `PadToLongest`, so the gates check this very code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def load_texts(path: str | Path) -> list[str]:
    """The `text` of each row of a JSON Lines file (peftctl's completion format, the same file both sides read)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenize(tokenizer, texts: list[str]) -> list[dict]:
    """Token ids of each text with EOS appended, as causal-LM fine-tuning examples usually end."""
    return [{"input_ids": tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]} for text in texts]


class ListDataset:
    """A map-style dataset over a list of examples (what torch's DataLoader and the Trainer need)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class PadToLongest:
    """Pads each batch to its longest example, right side; labels are the inputs, -100 on the padding.

    The labels come from the attention mask, not from comparing ids with the pad id, so an EOS is trained even
    where pad == EOS. It also records each batch's real and padded token counts, in the order batches are made
    (which is the order the Trainer consumes them).
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.real_tokens: list[int] = []
        self.padded_tokens: list[int] = []

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            ids = torch.tensor(f["input_ids"], dtype=torch.long)
            input_ids[i, :len(ids)] = ids
            attention_mask[i, :len(ids)] = 1
            labels[i, :len(ids)] = ids
        self.real_tokens.append(sum(len(f["input_ids"]) for f in features))
        self.padded_tokens.append(len(features) * width)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_model(model_dir: str, *, quantized: bool, targets, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """The base model (bf16, or 4-bit NF4 with double quantisation and bf16 compute) with a LoRA adapter.

    On a machine without CUDA (the --tiny smoke test) the model stays in float32 and 4-bit computes in float32.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if on_gpu:  # each torchrun rank on its own GPU, as the docs show for DDP (one process: GPU 0)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_timer(collator: PadToLongest, spec: dict, say):
    """The measuring callback (a class made here so that importing this module needs no transformers)."""
    from transformers import TrainerCallback

    warmup, target = spec["warmup_steps"], spec.get("target_window_tokens")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.logs: list[dict] = []
            self.t_begin = self.t_last = None
            self.first_step_at = None  # wall clock (time.time) at the end of step 1
            self.began_at = None  # wall clock at the start of training (the Trainer's own set-up done)

        def on_train_begin(self, args, state, control, **kwargs):
            _synchronize()
            self.t_begin = self.t_last = time.perf_counter()
            self.began_at = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            now = time.perf_counter()
            i = state.global_step - 1  # batches are made, and consumed, in step order (gradient accumulation 1)
            record = {"step": state.global_step, "seconds": now - self.t_last,
                      "tokens": collator.real_tokens[i], "padded_tokens": collator.padded_tokens[i]}
            self.steps.append(record)
            self.t_last = now
            if state.global_step == 1:
                self.first_step_at = time.time()
            say(f"step {state.global_step}: {record['seconds']:.3f} s, {record['tokens']} real tokens "
                f"({record['padded_tokens']} with padding), {record['tokens'] / record['seconds']:,.0f} real tok/s")
            window = sum(s["tokens"] for s in self.steps[warmup:])
            if target and len(self.steps) > warmup and window >= target:
                control.should_training_stop = True  # case 2: as many real tokens as peftctl's measured window

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append({"step": state.global_step, "loss": logs.get("loss"),
                                  "grad_norm": logs.get("grad_norm")})

    return StepTimer()


def run(spec: dict) -> dict:
    phases = _Phases(spec.get("launched_at"))  # measuring only: where the seconds before the first step go
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    phases.mark("imports")

    def say(message: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:  # one voice under torchrun (step lines: rank 0's batch)
            print(f"[reference case {spec['case']}] {message}", flush=True)

    t_start = time.time()
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama 3 has no pad token; the labels come from the mask
    phases.mark("tokenizer")
    train_dataset = ListDataset(tokenize(tokenizer, load_texts(spec["data"])))
    collator = PadToLongest(tokenizer.pad_token_id)
    phases.mark("data")

    model = build_model(spec["model"], quantized=spec["quantized"], targets=spec["targets"], r=spec["r"],
                        alpha=spec["alpha"], dropout=spec["dropout"])
    phases.mark("model_load")
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(f"model loaded in {time.time() - t_start:.1f} s; {sum(p.numel() for p in trainable):,} trainable "
        f"parameters in {trainable[0].dtype}")

    training_args = TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["max_steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        bf16=on_gpu,
        use_cpu=not on_gpu,  # on a CPU (the smoke test) accelerate runs torchrun's ranks as DDP over gloo only so
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    timer = _step_timer(collator, spec, say)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[timer],
    )
    phases.mark("trainer")
    trainer.train()
    if timer.began_at is not None:
        phases.mark("train_begin", timer.began_at)

    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    first = timer.logs[0] if timer.logs else {}
    ranks = _gather_ranks({"rank": trainer.args.process_index, "peak_memory_bytes": peak,
                           "tokens": [s["tokens"] for s in timer.steps],
                           "padded_tokens": [s["padded_tokens"] for s in timer.steps]})
    for i, step in enumerate(timer.steps):  # a step's tokens: every rank's batch (rank 0's timing: DDP syncs them)
        step["tokens"] = sum(r["tokens"][i] for r in ranks if i < len(r["tokens"]))
        step["padded_tokens"] = sum(r["padded_tokens"][i] for r in ranks if i < len(r["padded_tokens"]))
    return {
        "side": "reference",
        "case": spec["case"],
        "status": "completed",
        "steps": timer.steps,
        "first_step_s": timer.steps[0]["seconds"] if timer.steps else None,
        "first_step_from_launch_s": (timer.first_step_at - spec["launched_at"]) if timer.first_step_at else None,
        "peak_memory_bytes": peak,
        "world_size": len(ranks),
        "memory_per_rank": [{"rank": r["rank"], "peak_memory_bytes": r["peak_memory_bytes"]} for r in ranks],
        "first_loss": first.get("loss"),
        "first_grad_norm": first.get("grad_norm"),
        "adapter_dtype": str(trainable[0].dtype).replace("torch.", ""),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "gradient_checkpointing": True,
        "total_s": round(time.time() - t_start, 2),
        "setup_phases": phases.seconds,
    }


class _Phases:
    """Seconds from the launch (bench.py's wall clock) to the end of each setup phase, phase by phase, as peftctl's
    run.json records its own (`launch` is the interpreter's start and this module's import)."""

    def __init__(self, launched_at: float | None):
        self.seconds: dict[str, float] = {}
        self._last = launched_at
        if launched_at is not None:
            self.mark("launch")

    def mark(self, name: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        if self._last is not None:
            self.seconds[name] = round(at - self._last, 3)
        self._last = at


def _gather_ranks(mine: dict) -> list[dict]:
    """Every rank's record under torchrun (the Trainer leaves the process group up); [mine] in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 writes for all
        Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
