"""What a run reports: run.json's manifest (with the versions and the device), the dry-run report, the summary
table at the end, and the notes on the data and on serving. The loop calls these; none of them trains.
"""

from __future__ import annotations

import platform
import time

from peftctl.errors import PeftctlError


def manifest(recipe, spec, data, counts, device, total_steps: int, checkpointing: bool, world, engine) -> dict:
    import peftctl

    return {
        "peftctl_version": peftctl.__version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "device": device_name(device),
        "world_size": world.size,
        "distributed": engine,
        "model": {"name": recipe.model.name, "revision": recipe.model.revision, "dtype": recipe.model.dtype,
                  "quantization": recipe.quantization.model_dump() if recipe.quantization else None},
        "method": {**recipe.method.model_dump(), "can_merge": spec.can_merge},
        "loraplus_lr_ratio": getattr(recipe.method, "loraplus_lr_ratio", None),
        "params": {"trainable": counts.trainable, "total": counts.total, "percent": round(counts.percent, 6)},
        "data": {"fingerprint": data.fingerprint, "packed": data.packed, "rows": len(data.train.rows),
                 "train": data.train.stats.as_dict(),
                 "validation": data.validation.stats.as_dict() if data.validation else None},
        "steps_total": total_steps,
        "gradient_checkpointing": checkpointing,
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def dry_run_report(recipe, data, steps_per_epoch: int, total_steps: int, say) -> dict:
    from peftctl.params import count_for_recipe

    train = data.train.stats
    report = {
        "examples": train.examples, "tokens": train.tokens, "trained_tokens": train.trained_tokens,
        "truncated": train.truncated, "skipped_no_trained_token": train.skipped_no_trained_token,
        "bad_rows": train.bad_rows, "special_text_rows": train.special_text_rows, "rows": len(data.train.rows),
        "packed": data.packed,
        "validation_examples": data.validation.stats.examples if data.validation else 0,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "tokenization_cached": train.from_cache,
    }
    if train.sources:
        report["sources"] = train.sources
    if data.warnings:
        report["warnings"] = data.warnings
    try:
        report["params"] = count_for_recipe(recipe).as_dict()
    except PeftctlError as e:
        report["params"] = {"error": e.message}
    return report


def summary(result, data, console, options) -> None:
    if options.quiet or console is None or options.log_format == "json":
        return
    from rich.table import Table

    table = Table(title="run finished", show_header=False, title_justify="left")
    table.add_row("run folder", result.run_dir)
    table.add_row("steps", str(result.steps))
    table.add_row("final train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-")
    table.add_row("final eval loss", f"{result.eval_loss:.4f}" if result.eval_loss is not None else "-")
    table.add_row("tokens/s (run average)", f"{result.tokens_per_s:,.0f}")
    table.add_row("examples", f"{data.train.stats.examples:,d} ({data.train.stats.truncated} truncated, "
                  f"{data.train.stats.bad_rows} bad rows skipped)")
    console.print(table)
    if result.evaluation:
        from peftctl.eval.report import table as evaluation_table

        console.print(evaluation_table(result.evaluation))


def warn_special_text(data, say) -> None:
    stats = data.train.stats
    if stats.special_text_rows:
        say(f"warning: {stats.special_text_rows:,d} example(s) hold a special token's text in their own text (first: "
            f"{stats.special_text_examples[0]}); it is encoded as that control token, as the chat template does at "
            "inference. Clean the data if that is not meant (`peftctl inspect-data` lists them)")


def serving(run_folder, model, recipe, say) -> dict:
    """run.json's `serving`: will the adapter serve as it is (vLLM, llama.cpp)? Its notes are said at once."""
    from peftctl.serving import serving_check

    report = serving_check(run_folder.adapter, getattr(model.config, "architectures", None),
                           recipe.quantization.model_dump() if recipe.quantization else None)
    for note in report["notes"]:
        say(f"note: {note}")
    return report
