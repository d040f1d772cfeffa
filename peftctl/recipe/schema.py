"""The recipe, as typed models: every key of docs/RECIPE.md with its default and a description.

Descriptions here are the single source of the reference: `peftctl schema`, `peftctl init` and the README's recipe
reference are generated from them. Rules that involve several keys live in `rules.py`, not here, so that each
rule can name the exact key (and line) it is about.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field

from peftctl.methods.registry import METHODS
from peftctl.recipe.base import Section

Dtype = Literal["bfloat16", "float16", "float32", "auto"]


class ModelSection(Section):
    name: str = Field(min_length=1, description="Hub id (org/name) or a local model folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); a hub id with "
                                 "trust_remote_code needs one pinned.")
    dtype: Dtype = Field("bfloat16", description="dtype of the weights that are not quantised.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto picks the fastest that isolates packed examples.")
    input_embeddings: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="Where the frozen input embedding lives while training: cpu keeps it in host "
        "memory and sends each micro-batch's rows to the GPU (saves vocabulary x hidden x 2 bytes: 0.98 GiB on "
        "Llama 3 8B); auto does so for a quantised base with gradient checkpointing on one GPU; gpu never.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code. Only for "
                                    "repositories you trust, with a pinned revision.")
    chat_template: str | None = Field(None, description="Chat template for chat data when the tokenizer has none "
                                      "(or to replace it): a built-in name (chatml, llama3, gemma, mistral) or a "
                                      "Jinja file. Saved with the adapter.")


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(4, description="Quantise the frozen base weights to 4 or 8 bits (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (4-bit only).")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (4-bit only; "
                               "saves about 0.4 bits per weight).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype the "
                                                                      "quantised layers compute in.")
    upcast_embeddings: bool = Field(False, description="Keep the embeddings and output head in float32, as "
                                    "peft's prepare_model_for_kbit_training does (about +2 GiB on an 8B model).")
    keep_dequantized: Literal["auto"] | bool = Field(
        "auto", description="Keep each LoRA-adapted 4-bit layer's weight dequantised (in compute_dtype, which must "
        "equal model.dtype) for the whole run instead of dequantising it in every step: about 3% faster on Llama 3 "
        "8B all-linear, for compute_dtype's bytes a weight (13 GiB there in bf16). auto: only with gradient "
        "checkpointing off, where the memory plan with them leaves a tenth of the GPU free.")


# A Union built from the registry: `X | Y` cannot be written over a tuple (and ruff's rewrite would break it).
AnyMethodSection = Annotated[Union[tuple(spec.section for spec in METHODS.values())], Discriminator("name")]  # noqa: UP007


class DatasetSource(Section):
    path: str = Field(min_length=1, description="Local file or folder (json, jsonl, csv, parquet) or hub "
                      "dataset id.")
    format: Literal["alpaca", "chat", "completion", "prompt_completion"] = Field(
        "alpaca", description="Row format of this source (see dataset.format).")
    fields: dict[str, str] = Field({}, description="Rename this source's columns to the format's names.")
    split: str = Field("train", min_length=1, description="Split to take.")
    weight: float = Field(1.0, gt=0, description="Share of the mixture, relative to the other weighted sources "
                          "(the mixture has as many examples as its weighted sources together).")
    examples: int | None = Field(None, ge=1, description="Take exactly this many examples from this source "
                                 "instead of a weighted share (repeating it when it has fewer).")
    system_prompt: str | None = Field(None, description="System message for this source's chat rows that have "
                                      "none.")

    def problems(self) -> list[tuple[tuple, str]]:
        if self.examples is not None and self.explicitly_set("weight"):
            return [(("weight",), "give weight or examples, not both")]
        return []


class DatasetSection(Section):
    path: str | None = Field(None, min_length=1, description="Local file or folder (json, jsonl, csv, parquet) or "
                             "hub dataset id (or give several sources in mix).")
    mix: list[DatasetSource] | None = Field(None, min_length=1, description="Several sources mixed by weight (or "
                                            "a number of examples each) with the seed, instead of path; the run "
                                            "folder reports how many examples and tokens came from each.")
    format: Literal["alpaca", "chat", "completion", "prompt_completion"] = Field(
        "alpaca", description="Row format: alpaca {instruction, input, output}; chat {messages}; completion "
        "{text}; prompt_completion {prompt, completion}.")
    fields: dict[str, str] = Field({}, description="Rename columns to the format's names, e.g. "
                                   "{instruction: question, output: answer}.")
    split: str = Field("train", min_length=1, description="Split to train on.")
    validation: float | str | None = Field(0.05, description="Validation data: a fraction of the training rows "
                                           "(0 or null for none), or a path/hub id of its own.")
    max_length: int = Field(2048, ge=8, le=1_048_576, description="Tokens per example (and per packed row). "
                            "Longer examples are cut on the right and counted; one left with no trained token "
                            "is skipped and counted.")
    train_on_prompt: bool = Field(False, description="false: loss only on responses / assistant turns.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Put several examples in one row, each attending only to itself. auto: pack where "
        "the model keeps packed examples apart (checked at start-up; gpt-oss's sinks and sliding windows and "
        "Qwen3-Next's linear attention do not), else one example a row, with a note; true: pack or stop with "
        "exit 2. Off for prefix/prompt/p_tuning, which cannot pack.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="error: stop at the first bad row "
                                                  "(file and row named); skip: skip and count them.")
    system_prompt: str | None = Field(None, description="System message for chat rows that have none.")

    def sources(self) -> list[DatasetSource]:
        """The sources to read: the mix, or the one `path` with this section's format settings."""
        if self.mix:
            return list(self.mix)
        return [DatasetSource(path=self.path, format=self.format, fields=dict(self.fields), split=self.split,
                              system_prompt=self.system_prompt)]


class TrainingSection(Section):
    max_steps: int | None = Field(None, ge=1, description="When set, the run ends here and epochs is ignored.")
    epochs: int = Field(1, ge=1, le=10_000, description="Passes over the training data.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward pass (with packing: rows of "
                                  "max_length tokens).")
    micro_batch_tokens: int | None = Field(None, ge=8, description="Size micro-batches by tokens instead: as many "
                                           "rows as fit this many tokens, padding counted (exclusive with "
                                           "micro_batch_size; at least dataset.max_length).")
    gradient_accumulation: int = Field(4, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(2.0e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps (exclusive with warmup_ratio).")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps "
                                       "(exclusive with warmup_steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (null: no clipping).")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="What a NaN/inf loss or gradient does: stop "
                                                  "(after keeping the last good state) or skip the batch.")
    gradient_checkpointing: Literal["auto"] | bool = Field("auto", description="Recompute activations in the "
                                                           "backward pass; auto: only when the memory plan needs it.")
    seed: int = Field(42, ge=0, lt=2**63, description="Seed for initialisation, data order and dropout "
                      "(0 to 2**63-1, what torch, numpy and datasets all accept).")
    eval_every: int = Field(100, ge=1, description="Evaluate every this many steps (and at the end).")
    save_every: int = Field(100, ge=1, description="Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Write a metrics line every this many steps.")
    keep_best: bool = Field(False, description="Also keep the checkpoint with the best validation loss, and write "
                            "adapter/ from it at the end (run.json names its step). Needs validation data.")
    patience: int | None = Field(None, ge=1, description="Stop early when the validation loss has not improved "
                                 "for this many evaluations. Needs validation data.")
    distributed: Literal["auto", "ddp", "fsdp"] = Field("auto", description="With several processes: ddp keeps a "
                                                         "whole model per GPU; fsdp shards it (FSDP2, bf16/fp16 "
                                                         "bases only); auto picks ddp when the memory plan fits one "
                                                         "GPU, else fsdp.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (fused on the GPU); the bitsandbytes 8-bit and paged variants save optimiser "
        "memory (GPU only).")


class OutputSection(Section):
    dir: str = Field(min_length=1, description="The run folder.")
    merge: bool = Field(False, description="Also write a merged model to dir/merged at the end.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field([], description="Where to report metrics "
                                                                       "besides metrics.jsonl: tensorboard (dir/"
                                                                       "tensorboard), wandb, mlflow. Nothing is sent "
                                                                       "anywhere unless listed here.")
    project: str | None = Field(None, description="Tracker project (wandb) or experiment (mlflow) name.")
    run_name: str | None = Field(None, description="Tracker run name (default: the run folder's name).")
    tags: list[str] = Field([], description="Tracker tags.")


class EvaluationSection(Section):
    data: str = Field(min_length=1, description="Held-out data (a file or folder, or a hub dataset id) evaluated "
                      "at the end of training as `peftctl eval base RUN --data ...` would, with results in run.json "
                      "and the summary.")
    format: Literal["alpaca", "chat", "completion", "prompt_completion"] | None = Field(
        None, description="Row format of the data (default: dataset.format).")
    fields: dict[str, str] | None = Field(None, description="Rename columns to the format's names (default: "
                                          "dataset.fields when the format is dataset.format).")
    metrics: list[str] | None = Field(None, description="loss, perplexity, exact_match, token_f1, rouge_l (default: "
                                      "all), or module:function -- your own metric, which runs your code.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per example (greedy).")
    batch_size: int = Field(16, ge=1, description="Prompts per batched generation.")
    limit: int | None = Field(None, ge=1, description="Evaluate the first this many examples only.")
    compare_base: bool = Field(True, description="Also evaluate the base model, with the adapter's difference "
                               "to it and a bootstrap interval.")


class Recipe(Section):
    model: ModelSection = Field(description="The base model.")
    quantization: QuantizationSection | None = Field(None, description="Quantise the frozen base; omit for none.")
    method: AnyMethodSection = Field(description="The PEFT method and its settings.")
    dataset: DatasetSection = Field(description="Training data.")
    training: TrainingSection = Field(TrainingSection(), description="The training loop.")
    output: OutputSection = Field(description="Where the run is written.")
    evaluation: EvaluationSection | None = Field(None, description="Evaluate the adapter on held-out data at the "
                                                 "end (`peftctl eval`); omit for none.")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "quantization": QuantizationSection,
    "dataset": DatasetSection,
    "training": TrainingSection,
    "output": OutputSection,
    "evaluation": EvaluationSection,
}
