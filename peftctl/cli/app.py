"""The `peftctl` command line: a thin layer over the library.

Each command's body imports its module only when it runs, so `peftctl --help`, `validate`, `init` and `schema`
never import torch or transformers. Every body runs under `errors.run_guarded`, the one place where failures
become messages and exit codes.
"""

import sys

import typer

from peftctl import __version__
from peftctl.cli.errors import run_guarded
from peftctl.cli.help_style import PlainHelpCommand, PlainHelpGroup

app = typer.Typer(
    name="peftctl",
    cls=PlainHelpGroup,
    help="Parameter-efficient fine-tuning of language models from YAML recipes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SetOption = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                         help="Override a recipe key with the same dotted name, e.g. --set method.r=32 (repeatable).")

TrustRemoteCodeOption = typer.Option(False, "--trust-remote-code", help="Run the base model's own Python code "
                                     "(its auto_map). Only for code you have read; a hub base needs a pinned "
                                     "revision. An adapter's own record never switches this on.")


def _exit(code: int) -> None:
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peftctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Parameter-efficient fine-tuning of language models from YAML recipes."""


@app.command(cls=PlainHelpCommand)
def validate(
    recipes: list[str] = typer.Argument(..., metavar="RECIPE...", help="Recipe files ('-' reads standard input)."),
    sets: list[str] | None = SetOption,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Check recipes against the schema and its rules; exit 0 when all are valid, 2 otherwise."""
    from peftctl.cli import validate as command

    _exit(run_guarded(lambda: command.run(recipes, sets or [], json_output)))


@app.command(cls=PlainHelpCommand)
def init(
    method: str = typer.Option("lora", "--method", "-m", help="lora, qlora, prefix_tuning, prompt_tuning, "
                               "p_tuning, ia3 or adapter."),
    model: str = typer.Option("meta-llama/Meta-Llama-3-8B", "--model", help="Hub id or local folder."),
) -> None:
    """Print a commented starter recipe that validates."""
    from peftctl.cli import init as command

    _exit(run_guarded(lambda: command.run(method, model)))


@app.command(cls=PlainHelpCommand)
def schema() -> None:
    """Print the recipe's JSON Schema (for editors' YAML language servers)."""
    from peftctl.cli import schema as command

    _exit(run_guarded(command.run))


@app.command(cls=PlainHelpCommand)
def train(
    recipe: str = typer.Argument(..., help="Recipe file ('-' reads standard input)."),
    sets: list[str] | None = SetOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, load the tokenizer and data, print the plan; "
                                 "load no weights and train nothing."),
    resume: str | None = typer.Option(None, "--resume", metavar="auto|PATH", help="'auto' (the newest good "
                                      "checkpoint of output.dir) or a checkpoint folder."),
    force: bool = typer.Option(False, "--force", help="Replace a run already in output.dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary; errors only."),
    log_format: str = typer.Option("text", "--log-format", metavar="text|json", help="text, or json: one JSON "
                                   "object per step on stdout."),
    gpus: int | None = typer.Option(None, "--gpus", min=1, metavar="N", help="Start this many processes on this "
                                    "machine (one per GPU)."),
) -> None:
    """Train the recipe's adapter and write the run folder."""
    from peftctl.cli import train as command

    _exit(run_guarded(lambda: command.run(recipe, sets or [], dry_run=dry_run, resume=resume, force=force,
                                          quiet=quiet, log_format=log_format, gpus=gpus)))


@app.command(cls=PlainHelpCommand)
def merge(
    adapter_dir: str = typer.Argument(..., help="An adapter folder (RUN/adapter) or a run folder."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the merged model to."),
    base: str | None = typer.Option(None, "--base", help="Base model (default: the one recorded with the "
                                       "adapter)."),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: the "
                                        "base's)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check layer by layer that the merged logits "
                                "equal base + adapter and differ from the base; on failure exit 1 and write "
                                "nothing."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard of the output."),
    from_quantized: str = typer.Option("dequantized", "--from-quantized", help="For adapters trained on a "
                                       "quantised base: merge onto the dequantised weights (reproduces training) "
                                       "or the original ones. 8-bit bases: dequantized uses bitsandbytes' int8 "
                                       "weights (its run-time input quantisation cannot be merged)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    device: str = typer.Option("auto", "--device", help="Where to merge and verify: auto (the GPU when there is "
                               "one), cuda or cpu."),
    trust_remote_code: bool = TrustRemoteCodeOption,
) -> None:
    """Fold an adapter into its base model and write an ordinary model folder."""
    from peftctl.cli import merge as command

    _exit(run_guarded(lambda: command.run(adapter_dir, out, base=base, dtype=dtype, verify=verify,
                                          max_shard_size=max_shard_size, from_quantized=from_quantized,
                                          force=force, device=device, trust_remote_code=trust_remote_code)))


@app.command("count-params", cls=PlainHelpCommand)
def count_params(
    recipe: str | None = typer.Argument(None, help="Recipe file ('-' reads standard input)."),
    sets: list[str] | None = SetOption,
    model: str | None = typer.Option(None, "--model", help="Hub id or local folder (without a recipe)."),
    method: str = typer.Option("lora", "--method", help="Method (without a recipe)."),
    r: int | None = typer.Option(None, "--r", help="LoRA rank."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha."),
    targets: str | None = typer.Option(None, "--targets", help="Comma-separated target modules, or all-linear."),
    bits: int | None = typer.Option(None, "--bits", help="Quantise the base to 4 or 8 bits."),
    num_virtual_tokens: int | None = typer.Option(None, "--num-virtual-tokens", help="For prompt methods."),
    micro_batch_size: int | None = typer.Option(None, "--micro-batch-size", min=1, help="For --memory: rows "
                                                   "per micro-batch (training.micro_batch_size)."),
    max_length: int | None = typer.Option(None, "--max-length", min=8, help="For --memory: tokens per row "
                                             "(dataset.max_length)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    memory: bool = typer.Option(False, "--memory", help="Also estimate peak GPU memory for the recipe."),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help="Card size to plan for, e.g. 24GiB "
                                             "(default: the local GPU)."),
) -> None:
    """Count what a recipe trains, from the model's config alone (no weights are loaded)."""
    from peftctl.cli import count_params as command

    _exit(run_guarded(lambda: command.run(recipe, sets or [], model=model, method=method, r=r, alpha=alpha,
                                          targets=targets, bits=bits, num_virtual_tokens=num_virtual_tokens,
                                          micro_batch_size=micro_batch_size, max_length=max_length,
                                          json_output=json_output, memory=memory, gpu_memory=gpu_memory)))


@app.command("inspect-data", cls=PlainHelpCommand)
def inspect_data(
    recipe: str = typer.Argument(..., help="Recipe file ('-' reads standard input)."),
    sets: list[str] | None = SetOption,
    n: int = typer.Option(3, "-n", min=0, help="Examples to render."),
) -> None:
    """Show examples exactly as the model will see them: trained tokens highlighted, EOS shown, lengths."""
    from peftctl.cli import inspect_data as command

    _exit(run_guarded(lambda: command.run(recipe, sets or [], n)))


@app.command(cls=PlainHelpCommand)
def generate(
    source: str = typer.Argument(..., metavar="ADAPTER_OR_MODEL", help="An adapter folder, run folder or a merged "
                                 "model folder."),
    prompt: str | None = typer.Argument(None, help="The prompt (default: one prompt per line of stdin; a blank "
                                           "line gives a blank line). Output: one line per prompt, with newlines "
                                           "written as \\n and backslashes as \\\\."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template (same as --format chat)."),
    prompt_format: str | None = typer.Option(None, "--format", metavar="alpaca|chat|raw",
                                                help="How to wrap each prompt: Alpaca's preamble, the chat template, "
                                                "or as it is (default: the format the adapter was trained on)."),
    jsonl: bool = typer.Option(False, "--jsonl", help="stdin lines are JSON strings or objects with a \"prompt\" key "
                               "(prompts may hold newlines); each answer is printed as one JSON string."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    trust_remote_code: bool = TrustRemoteCodeOption,
) -> None:
    """Generate from a prompt with an adapter on its base (or a merged model)."""
    from peftctl.cli import generate as command

    _exit(run_guarded(lambda: command.run(source, prompt, chat=chat, max_new_tokens=max_new_tokens,
                                          temperature=temperature, prompt_format=prompt_format, jsonl=jsonl,
                                          trust_remote_code=trust_remote_code)))


@app.command("eval", cls=PlainHelpCommand)
def eval_(
    targets: list[str] = typer.Argument(..., metavar="TARGET...", help="Run folders, adapter folders, model folders, "
                                        "base:MODEL, or base (the first adapter's base, loaded as it was trained)."),
    data: str = typer.Option(..., "--data", "-d", help="Held-out data: a file or folder (jsonl, json, csv, parquet) "
                             "or hub dataset id."),
    format: str | None = typer.Option(None, "--format", "-f", help="alpaca, chat, completion or "
                                         "prompt_completion (default: the first run folder's, else alpaca)."),
    fields: list[str] | None = typer.Option(None, "--field", metavar="NAME=COLUMN", help="Map a format name "
                                               "to a column, e.g. --field output=answer (repeatable)."),
    metrics: list[str] | None = typer.Option(None, "--metrics", "-m", help="Comma-separated: loss, perplexity, "
                                                "exact_match, token_f1, rouge_l (default: all), or your function "
                                                "as module:function -- which runs your code."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per batched generation."),
    max_length: int | None = typer.Option(None, "--max-length", min=8, help="Tokens per example for the loss, "
                                             "as dataset.max_length (default: the run's, else 2048)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate the first N examples only."),
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    out: str | None = typer.Option(None, "--out", "-o", help="Write each example's prompt, reference and "
                                      "predictions to this JSON Lines file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    trust_remote_code: bool = TrustRemoteCodeOption,
) -> None:
    """Evaluate base and adapters side by side on held-out data: loss, exact match, F1, ROUGE-L, with intervals."""
    from peftctl.cli import eval as command

    _exit(run_guarded(lambda: command.run(targets, data=data, format=format, fields=fields or [],
                                          metrics=metrics or [], max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, max_length=max_length, limit=limit,
                                          json_output=json_output, out=out, force=force, bootstrap=bootstrap,
                                          seed=seed, trust_remote_code=trust_remote_code)))


@app.command(cls=PlainHelpCommand)
def fetch(
    recipe: str = typer.Argument(..., help="Recipe file ('-' reads standard input)."),
    sets: list[str] | None = SetOption,
) -> None:
    """Download the recipe's model and datasets into the local caches (for offline training)."""
    from peftctl.cli import fetch as command

    _exit(run_guarded(lambda: command.run(recipe, sets or [])))


@app.command(cls=PlainHelpCommand)
def push(
    run_dir: str = typer.Argument(..., help="A finished run folder."),
    repo_id: str = typer.Argument(..., help="owner/name on the hub."),
    merged: bool = typer.Option(False, "--merged", help="Upload merged/ instead of adapter/."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
) -> None:
    """Upload the adapter (or merged model) with a model card made from the run."""
    from peftctl.cli import push as command

    _exit(run_guarded(lambda: command.run(run_dir, repo_id, merged=merged, private=private)))


def _quiet_libraries() -> None:
    """transformers, datasets and peft print progress bars and deprecation notices meant for their developers;
    our users get our own progress and messages (PEFTCTL_DEBUG=1 shows theirs again)."""
    import os
    import warnings

    if os.environ.get("PEFTCTL_DEBUG"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|datasets|torch|bitsandbytes)")


def main() -> None:
    from peftctl import startup

    _quiet_libraries()
    startup.prepare(sys.argv[1:])  # this process runs one command: skip what that command never needs
    try:
        app(prog_name="peftctl")
    except SystemExit as e:
        sys.exit(e.code)
