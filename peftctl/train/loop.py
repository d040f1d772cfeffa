"""`peftctl train`: from a validated recipe to a finished run folder.

Read `train` from top to bottom: setup (in an order that matters, explained where it does), the loop, the end.
"""

from __future__ import annotations

import math
import os
import platform
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml

from peftctl.errors import EXIT_OOM, EXIT_SIGTERM, DataError, InvalidInput, OutOfMemory, PeftctlError, TrainingStopped
from peftctl.methods.registry import METHODS
from peftctl.train import checkpoint as ckpt
from peftctl.train import distributed
from peftctl.adapter_folder import ADAPTER_INFO
from peftctl.files import atomic_write_text, staged_dir
from peftctl.train.run_folder import RunFolder

MAX_NONFINITE_IN_A_ROW = 5


@dataclass
class TrainOptions:
    resume: str | None = None
    force: bool = False
    quiet: bool = False
    log_format: str = "text"
    dry_run: bool = False


@dataclass
class RunResult:
    run_dir: str
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    counts: dict = field(default_factory=dict)
    evaluation: dict | None = None  # the recipe's evaluation: section, as `peftctl eval --json` prints it


def train(loaded, options: TrainOptions, console=None):
    """Train the recipe into its run folder. Around the run itself: the folder's lock is released on every way out,
    SIGTERM outside the loop (setup, saving the adapter, merging) raises so that half-built folders are removed,
    and an exit that the loop did not record (after it, or before it began) still ends up in run.json."""
    run = RunFolder(loaded.recipe.output.dir)
    try:
        with _sigterm_raises():
            return _train(loaded, options, console)
    except BaseException as e:
        if run.locked_here():
            _record_exit(run, e)
        raise
    finally:
        run.release()


def _record_exit(run: RunFolder, e: BaseException) -> None:
    """Write the status of an exit that the loop's own handlers did not see (run.json still says running)."""
    manifest = run.read_manifest()
    if manifest.get("status") != "running":
        return
    code = getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1)
    status = {130: "aborted", EXIT_SIGTERM: "stopped"}.get(code, "failed")
    run.write_manifest({**manifest, "status": status, "exit_code": code,
                        "error": f"{type(e).__name__}: {getattr(e, 'message', None) or e}"[:500]})


@contextmanager
def _sigterm_raises():
    def handle(signum, frame):
        raise TrainingStopped("stopped by SIGTERM outside the training loop; no checkpoint was written for it",
                              EXIT_SIGTERM, hint="the last checkpoint, if any, is intact: --resume auto continues")

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(loaded, options: TrainOptions, console=None):
    import torch

    from peftctl.data.prepare import prepare
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import check_packing_isolation, load_model, load_tokenizer, pick_device
    from peftctl.params import check_targets, count_parameters
    from peftctl.serving import serving_check
    from peftctl.train.fused_lora import fuse_lora_layers
    from peftctl.train.kernels import apply_fast_kernels, skip_adapter_input_casts
    from peftctl.train.loss import build_loss
    from peftctl.train.metrics import Metrics, plot_loss
    from peftctl.train.optim import build_optimizer, build_scheduler
    from peftctl.train.signals import graceful_stop
    from peftctl.train.trackers import Trackers
    from peftctl.train.trackers import check_available as check_trackers

    recipe, t_start = loaded.recipe, time.time()
    spec = METHODS[recipe.method.name]
    training = recipe.training
    say = _sayer(console, options.quiet)
    run = RunFolder(recipe.output.dir)
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    world = distributed.from_environment()
    device = distributed.init(world) if world.distributed else None  # the collectives below need the process group
    if not world.main:
        say = _sayer(None, True)  # one voice: rank 0 reports for all

    # The run folder is claimed before anything slow, so a wrong output.dir fails in a second, not after loading.
    if not options.dry_run:
        check_trackers(recipe.output.trackers)  # a missing extra fails now, not after the model has loaded
        distributed.on_main(world, lambda: run.claim(resume=options.resume is not None, force=options.force,
                                              inputs=_input_paths(recipe)))
        done = _completed(run, options.resume, recipe_yaml, say)
        if done is not None:
            return done
    resume_from = _resume_point(run, options.resume, say)

    # The tokenizer comes first: the data needs it, and a dry run stops after the data without loading weights.
    # Rank 0 tokenises first; the others then read its cache instead of all writing it at once.
    tokenizer = load_tokenizer(recipe.model, base_dir=loaded.base_dir)
    data = distributed.on_main(world, lambda: prepare(recipe.dataset, tokenizer, seed=training.seed,
                                               pad_id=tokenizer.pad_token_id))
    if not world.main:
        data = prepare(recipe.dataset, tokenizer, seed=training.seed, pad_id=tokenizer.pad_token_id)

    _warn_special_text(data, say)
    if recipe.evaluation is not None and world.main:
        from peftctl.eval.in_training import check_before_training

        check_before_training(recipe, tokenizer)  # bad evaluation data stops the run now, not after training

    for warning in data.warnings:
        say(f"warning: {warning}")

    # The number of steps comes from the data; the schedule needs it, so the optimiser is built after the data.
    schedule = data.step_schedule(training, world.size)
    total_steps = training.max_steps or schedule.total(training.epochs)
    if options.dry_run:
        return _dry_run_report(recipe, data, schedule.steps_in(0), total_steps, say)

    device = device or pick_device()
    checkpointing = _gradient_checkpointing(recipe, device, data)
    _seed_everything(training.seed)  # before the adapter exists: its initial weights come from this seed
    model = load_model(recipe, device, gradient_checkpointing=checkpointing)
    if data.packed:
        isolated, difference, contamination = check_packing_isolation(model, device, len(tokenizer))
        if not isolated and recipe.dataset.packing == "auto":
            # Unpacked rows train the same examples; only packing's speed is lost.
            say(f"note: {model.config.model_type}'s attention does not keep packed examples apart: one example "
                "a row (dataset.packing: auto)")
            unpacked = recipe.dataset.model_copy(update={"packing": False})
            data = distributed.on_main(world, lambda: prepare(unpacked, tokenizer, seed=training.seed,
                                                       pad_id=tokenizer.pad_token_id))
            if not world.main:
                data = prepare(unpacked, tokenizer, seed=training.seed, pad_id=tokenizer.pad_token_id)
            schedule = data.step_schedule(training, world.size)
            total_steps = training.max_steps or schedule.total(training.epochs)
        elif not isolated:
            raise InvalidInput(f"{model.config.model_type}: this model's attention does not keep packed examples "
                               f"apart (difference {difference:.3g} against {contamination:.3g} unpacked)",
                               hint="set dataset.packing: auto (falls back to one example a row) or false, or model.attn_implementation "
                                    "to sdpa or eager")
    kernels = apply_fast_kernels(model, device)  # before the adapter: peft then wraps the patched layers as usual
    check_targets(model, recipe.method, loaded.where("method.targets"))  # peft skips a name that matches nothing
    model = runtime.attach(model, recipe.method, AttachContext(tokenizer_path=recipe.model.name,
                                                               tokenizer_revision=recipe.model.revision,
                                                               where=loaded.where("method.targets")))
    for note in getattr(model, "peftctl_notes", []):
        say(f"note: {note}")
    if recipe.method.init_from:
        runtime.initialise_from(model, recipe.method, recipe.method.init_from)
        say(f"starting from the adapter in {recipe.method.init_from}")
    if fuse_lora_layers(model):
        kernels = kernels + ["fused_lora_branch"]
    model.train()
    loss_fn, loss_name = build_loss(model, spec, device)
    engine = distributed.choose_engine(recipe, world, device)  # None, ddp or fsdp
    step_module = distributed.wrap(model, loss_fn, world, device, engine)
    # Evaluation: through the sharded module under FSDP (its forward gathers the weights); around DDP's wrapper
    # otherwise, since rank 0 evaluates alone and DDP's forward would wait for the others.
    eval_loss = (lambda m, batch: step_module(batch)) if engine == "fsdp" else loss_fn
    counts = count_parameters(model)
    say(counts.line())

    optimizer = build_optimizer(model, recipe, device)
    scheduler = build_scheduler(optimizer, training, total_steps)
    state = ckpt.TrainerState()
    if resume_from is not None:
        state = _resume(resume_from, model, optimizer, scheduler, recipe, data.fingerprint, world, say,
                        engine=engine)

    autocast_dtype = _autocast_dtype(recipe, device)
    if autocast_dtype is not None and skip_adapter_input_casts(model):
        kernels = kernels + ["adapter_inputs_in_autocast_dtype"]
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    manifest = _manifest(recipe, spec, data, counts, device, total_steps, checkpointing, world, engine)
    manifest["fast_path"] = {"kernels": kernels, "loss": loss_name, "autocast": str(autocast_dtype)}
    if resume_from is not None and world.main:
        manifest["resume"] = _resume_record(run, resume_from, state.step)
    metrics = None
    if world.main:
        run.clear_previous()  # --force: the old run goes only now, after the data and the model have loaded
        run.write_manifest({**manifest, "status": "running"})
        atomic_write_text(run.recipe, recipe_yaml)
        trackers = Trackers(recipe.output.trackers, run.path, recipe, resume_step=state.step)
        metrics = Metrics(run.metrics, total_steps=total_steps, log_format=options.log_format, quiet=options.quiet,
                          trackers=trackers, resume_step=state.step)

    def save_checkpoint():
        # Collectives first, on every rank: the full weights and optimiser state (gathered under FSDP) and every
        # rank's random streams (for an exact resume); then rank 0 writes.
        weights = distributed.full_trainable_state(model)
        optimizer_state = distributed.optimizer_state(model, optimizer, engine)
        rngs = distributed.gather_objects(world, ckpt.rng_state())
        path = None
        if world.main:
            path = ckpt.save(run.checkpoints, weights, optimizer_state, scheduler, state, recipe_yaml,
                             data.fingerprint, training.keep_checkpoints, rngs=rngs, world_size=world.size,
                             engine=engine)
        distributed.barrier(world)
        return path

    def finish(status: str, exit_code: int, **extra) -> None:
        if not world.main:
            return
        metrics.final({"status": status, "exit_code": exit_code, "run_dir": str(run.path), "steps_done": state.step,
                       **({"error": extra["error"]} if "error" in extra else {})})
        metrics.close(status)
        plot_loss(metrics.records, run.loss_plot)
        peak = _peak_since(device, setup_peak)
        run.write_manifest({**manifest, **extra, "status": status, "exit_code": exit_code,
                            "steps_done": state.step, "tokens_seen": state.tokens_seen,
                            "timings": {"total_s": round(time.time() - t_start, 2), "train_s": round(train_s, 2),
                                        "setup_s": round(t_loop - t_start, 2),
                                        "first_step_s": round(first_step_s, 2) if first_step_s else None,
                                        "train_s_all_attempts": round(train_s + manifest.get("resume", {}).get(
                                            "earlier_train_s", 0), 2)},
                            "peak_memory_bytes": peak, "nonfinite_skipped": state.nonfinite_skipped})

    train_s, last_loss, last_eval, nonfinite_in_a_row, first_step_s = 0.0, None, None, 0, None
    setup_peak = _start_loop_peak(device)
    t_loop = time.time()
    batches = StepBatches(data, schedule, world, pin=device.type == "cuda")
    try:
        with graceful_stop() as stop, batches:
            if metrics is not None:
                metrics.on_output_closed = stop.output_closed  # a broken pipe stops like a signal, exit 1
            while state.step < total_steps:
                if state.step_in_epoch >= schedule.steps_in(state.epoch):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                t_step = time.perf_counter()
                # This step's rows and micro-batches (collated in the background while the previous step ran).
                # The step's loss is normalised by all its trained tokens -- on every rank, counted on the host
                # from the row lengths, with no device sync. Each rank takes every world.size-th row.
                step_rows, micro_batches = batches.get(state.epoch, state.step_in_epoch)
                n_trained = max(1, data.trained_tokens(data.train, step_rows))
                # DDP averages gradients over the ranks; scaling by world.size turns that average into the sum.
                scale = world.size / n_trained
                step_loss = torch.zeros(2, device=device)  # [summed token loss, stop requested]
                for i, mb in enumerate(micro_batches):
                    mb = mb.to(device)
                    last = i == len(micro_batches) - 1
                    with distributed.accumulating(step_module, engine, last):
                        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                            token_loss = step_module(mb)
                        scaled = token_loss * scale
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss[0] += token_loss.detach()
                step_loss[1] = float(stop.requested)
                distributed.all_sum(world, step_loss)  # one collective: the global loss, and whether any rank must stop
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm comes back as a (replicated) DTensor
                    grad_norm = grad_norm.full_tensor()
                # The one host sync of a step: loss, gradient norm and stop flag together. Never step on (or save)
                # non-finite values.
                loss_value, norm_value, stop_flag = torch.stack([step_loss[0] / n_trained, grad_norm.float(),
                                                                 step_loss[1]]).tolist()
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_a_row += 1
                    kind = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    what = f"non-finite {kind} at step {state.step + 1}"
                    if training.on_nonfinite == "stop" or nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        if state.step > 0:
                            save_checkpoint()
                        raise PeftctlError(f"{what}; stopped with the last good state saved (step {state.step})",
                                           hint="lower training.learning_rate, keep training.max_grad_norm set, "
                                                "use bfloat16 instead of float16, or set training.on_nonfinite: skip")
                    state.nonfinite_skipped += 1
                    state.step_in_epoch += 1  # the batch is dropped, the data moves on
                    say(f"warning: {what}; batch skipped ({nonfinite_in_a_row} in a row)")
                    continue
                nonfinite_in_a_row = 0
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.step_in_epoch += 1
                step_tokens = data.real_tokens(data.train, step_rows)
                state.tokens_seen += step_tokens
                state.trained_tokens_seen += n_trained
                seconds = time.perf_counter() - t_step
                train_s += seconds
                first_step_s = first_step_s or (time.time() - t_loop)

                stop_everywhere = stop_flag > 0  # a signal on any rank stops all ranks at this same step
                if world.main and (state.step % training.log_every == 0 or state.step == total_steps):
                    last_loss = loss_value
                    metrics.log({"step": state.step, "epoch": state.epoch, "loss": last_loss,
                                 "lr": scheduler.get_last_lr()[0], "grad_norm": norm_value,
                                 "tokens": step_tokens, "tokens_per_s": step_tokens / max(seconds, 1e-9),
                                 "elapsed_s": round(time.time() - t_start, 2)})
                improved = stop_early = False
                if data.validation is not None and (state.step % training.eval_every == 0
                                                    or state.step == total_steps):
                    if world.main or engine == "fsdp":  # a sharded model needs every rank for a forward pass
                        last_eval = evaluate(model, data, training.micro_batch_size, device, autocast_dtype,
                                             eval_loss)
                    if world.main:
                        metrics.log({"step": state.step, "eval_loss": last_eval, "eval_ppl": _ppl(last_eval)})
                    last_eval = distributed.broadcast_object(world, last_eval)  # every rank decides the same below
                    improved = state.best_eval_loss is None or last_eval < state.best_eval_loss
                    if improved:
                        state.best_eval_loss, state.best_step, state.evals_without_improvement = last_eval, \
                            state.step, 0
                    else:
                        state.evals_without_improvement += 1
                        stop_early = bool(training.patience) and \
                            state.evals_without_improvement >= training.patience
                    if training.keep_best and improved and state.step < total_steps and not stop_everywhere:
                        save_checkpoint()  # the best so far; pruning keeps it beside the newest
                if stop_early:
                    say(f"stopping early at step {state.step}: no better validation loss for {training.patience} "
                        f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})")
                    break
                if stop_everywhere:
                    path = save_checkpoint()
                    raise TrainingStopped(f"stopped by {stop.name} at step {state.step}; checkpoint {path}",
                                          stop.exit_code if stop.requested else EXIT_SIGTERM,
                                          hint=f"continue with: peftctl train {loaded.source} --resume auto")
                if state.step % training.save_every == 0 and state.step < total_steps and not (
                        training.keep_best and improved):
                    save_checkpoint()
    except TrainingStopped as e:
        finish("stopped", e.exit_code)
        raise
    except KeyboardInterrupt:
        finish("aborted", 130)
        raise
    except torch.OutOfMemoryError as e:
        finish("failed", EXIT_OOM, error="out of GPU memory")
        raise _out_of_memory(recipe, state.step + 1, checkpointing) from e
    except BaseException as e:
        finish("failed", getattr(e, "exit_code", 1), error=f"{type(e).__name__}: {e}"[:500])
        raise

    # The end: the adapter (with its tokenizer and chat template), then the merged model when asked.
    tokens_per_s = state.tokens_seen / train_s if train_s else 0.0
    adapter_step = state.step
    if training.keep_best and state.best_step is not None and state.best_step != state.step:
        ckpt.load_adapter_weights(run.checkpoints / ckpt.name_for(state.best_step), model)
        adapter_step = state.best_step
    weights = distributed.full_trainable_state(model)  # gathered on every rank under FSDP
    # Every rank's peak, not rank 0's alone: ranks differ (FSDP shards, rank 0 also evaluates and saves).
    memory_per_rank = distributed.gather_objects(world, _rank_memory(device, setup_peak, world.rank))
    if world.main:
        save_adapter(model, spec, recipe, tokenizer, run, loraplus=getattr(recipe.method, "loraplus_lr_ratio", None),
                     weights=weights)
        serving = serving_check(run.adapter, getattr(model.config, "architectures", None),
                                recipe.quantization.model_dump() if recipe.quantization else None)
        for note in serving["notes"]:
            say(f"note: {note}")
        finish("completed", 0, final={"train_loss": last_loss, "eval_loss": last_eval},
               tokens_per_s=round(tokens_per_s), adapter_step=adapter_step,
               best={"step": state.best_step, "eval_loss": state.best_eval_loss},
               stopped_early=state.step < total_steps, serving=serving, memory_per_rank=memory_per_rank)
    distributed.barrier(world)
    distributed.close(world)
    if recipe.output.merge and world.main:
        _merge(run, recipe, say)
    evaluation = None
    if recipe.evaluation is not None and world.main:
        from peftctl.eval.in_training import evaluate_run

        evaluation = evaluate_run(recipe, run, say)
        run.write_manifest({**run.read_manifest(), "evaluation": evaluation})
    result = RunResult(str(run.path), state.step, last_loss, last_eval, tokens_per_s,
                       {"trainable": counts.trainable, "total": counts.total}, evaluation)
    if world.main:
        _summary(result, data, console, options)
    return result


class StepBatches:
    """The micro-batches of each step (this rank's share), collated one step ahead in a background thread (into
    pinned memory on the GPU), so the host prepares step k+1 while the device computes step k."""

    def __init__(self, data, schedule, world, *, pin: bool):
        self.data, self.schedule, self.world, self.pin = data, schedule, world, pin
        self._pending = None  # ((epoch, step_in_epoch), future)
        self._pool = None

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftctl-batches")
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _build(self, epoch: int, step_in_epoch: int):
        micro = self.schedule.step(epoch, step_in_epoch)
        rows = [r for mb in micro for r in mb]
        mine = [self.data.collate_rows(self.data.train, mb) for mb in micro[self.world.rank::self.world.size]]
        if self.pin:
            mine = [mb.pinned() for mb in mine]
        return rows, mine

    def get(self, epoch: int, step_in_epoch: int):
        """(every row of the step on all ranks, this rank's collated micro-batches)"""
        key = (epoch, step_in_epoch)
        if self._pending is not None and self._pending[0] == key:
            result = self._pending[1].result()
        else:
            result = self._build(epoch, step_in_epoch)
        last = step_in_epoch + 1 >= self.schedule.steps_in(epoch)
        following = (epoch + 1, 0) if last else (epoch, step_in_epoch + 1)
        self._pending = (following, self._pool.submit(self._build, *following))
        return result


def evaluate(model, data, micro_batch_size: int, device, autocast_dtype, loss_fn) -> float:
    """Mean loss per trained token over the whole validation split."""
    import torch

    model.eval()
    total, tokens = torch.zeros((), device=device), 0
    try:
        with torch.no_grad():
            row_ids = list(range(len(data.validation.rows)))
            for mb in data.micro_batches(data.validation, row_ids, micro_batch_size):
                tokens += mb.n_trained
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    total += loss_fn(model, mb.to(device))
    finally:
        model.train()
    return (total / max(1, tokens)).item()


def save_adapter(model, spec, recipe, tokenizer, run: RunFolder, *, loraplus=None, weights=None) -> None:
    import json

    from peftctl.generation_config import save_for_adapter as save_generation_config
    from peftctl.methods import runtime

    quant = recipe.quantization
    info = {"method": spec.name, "base_model": recipe.model.name, "revision": recipe.model.revision,
            "trust_remote_code": recipe.model.trust_remote_code, "dtype": recipe.model.dtype, "quantization": quant.model_dump() if quant else None,
            "loraplus_lr_ratio": loraplus, "can_merge": spec.can_merge,
            "prompt_format": recipe.dataset.sources()[0].format}  # what `peftctl generate` wraps prompts in
    with staged_dir(run.adapter) as tmp:
        runtime.save(model, spec, tmp, state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        save_generation_config(model, tokenizer, tmp)  # the chat template's end-of-turn among the stop tokens
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _merge(run: RunFolder, recipe, say) -> None:
    from peftctl.merge import merge_adapter

    merge_adapter(run.adapter, run.merged, force=True, report=say)


def _input_paths(recipe) -> list[str]:
    """Local files and folders the recipe reads (model, data, init_from, template): output.dir must not hold them."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
            found.append(value)

    walk({k: v for k, v in recipe.model_dump(mode="json").items() if k != "output"})
    return found


def _completed(run: RunFolder, requested: str | None, recipe_yaml: str, say):
    """--resume with the very recipe of a run that already completed: nothing to redo (its final state is adapter/,
    not a checkpoint). A changed recipe (more steps, say) goes the usual way through the checkpoints."""
    manifest = run.read_manifest()
    if requested is None or manifest.get("status") != "completed":
        return None
    try:
        if run.recipe.read_text() != recipe_yaml:
            return None
    except OSError:
        return None
    if requested != "auto":
        raise InvalidInput(f"--resume {requested}: the run in {run.path} is complete "
                           f"({manifest.get('steps_done')} steps); resuming would train it again from a checkpoint",
                           hint="its adapter is in adapter/; start again with --force, or train longer in a new "
                                "output.dir with method.init_from pointing at that adapter")
    say(f"the run in {run.path} is complete ({manifest.get('steps_done')} steps): nothing to resume")
    final = manifest.get("final") or {}
    return RunResult(str(run.path), manifest.get("steps_done") or 0, final.get("train_loss"),
                     final.get("eval_loss"), manifest.get("tokens_per_s") or 0.0)


def _resume_point(run: RunFolder, requested: str | None, say):
    if requested is None:
        return None
    path, notes = ckpt.find_resumable(run.checkpoints, requested)
    for note in notes:
        say(f"warning: {note}")
    if path is None:
        if requested == "auto" and not ckpt.list_checkpoints(run.checkpoints):
            say("no checkpoint to resume from: starting from step 0")
            return None
        raise InvalidInput(f"{run.checkpoints}: no intact checkpoint to resume from",
                           hint="start again with --force")
    say(f"resuming from {path}")
    return path


def _resume_record(run: RunFolder, checkpoint, step: int) -> dict:
    """run.json's account of a resume: the checkpoint and step, and the earlier attempts with their timings (this
    attempt's timings cover only itself; `train_s_all_attempts` adds theirs)."""
    prior = run.read_manifest()
    earlier = list(prior.get("resume", {}).get("earlier", []))
    if prior:
        earlier.append({"started_at": prior.get("started_at"), "status": prior.get("status"),
                        "steps_done": prior.get("steps_done"), "timings": prior.get("timings")})
    earlier_train_s = sum((e.get("timings") or {}).get("train_s") or 0 for e in earlier)
    return {"checkpoint": str(checkpoint), "step": step, "earlier": earlier,
            "earlier_train_s": round(earlier_train_s, 2)}


def _resume(path, model, optimizer, scheduler, recipe, data_fingerprint: str, world, say, *, engine=None):
    old_recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    trained, cadence = ckpt.recipe_differences(old_recipe, recipe.model_dump(mode="json"))
    if trained:
        raise InvalidInput(f"the recipe changed what is trained since {path.name}:\n  " + "\n  ".join(trained),
                           hint="resume with the recipe of that run (it is in the checkpoint as recipe.yaml), or "
                                "start a new run in another output.dir")
    for line in cadence:
        say(f"warning: changed since the checkpoint: {line}")
    state, raw = ckpt.load(path, model, optimizer, scheduler, rank=world.rank, engine=engine)
    saved_world = raw.get("world_size", 1)
    if saved_world != world.size:
        say(f"warning: {path.name} was written by {saved_world} process(es), this run has {world.size}: a step now "
            f"takes {world.size}/{saved_world} as many rows, so the data order from here differs from the "
            "original run's (no example is skipped or repeated within the epoch)")
    if raw.get("data_fingerprint") != data_fingerprint:
        raise DataError(f"the training data changed since {path.name} (fingerprint {raw.get('data_fingerprint')} "
                        f"-> {data_fingerprint})", hint="resume only with the same data, or start a new run")
    return state


def _out_of_memory(recipe, step: int, checkpointing: bool) -> OutOfMemory:
    """The message for an out-of-memory stop: the shapes that caused it, the plan, and the remedies in order."""
    training, dataset = recipe.training, recipe.dataset
    message = (f"out of GPU memory at step {step}: micro_batch_size {training.micro_batch_size} x max_length "
               f"{dataset.max_length} tokens, gradient checkpointing {'on' if checkpointing else 'off'}")
    try:
        from peftctl.plan import describe_plan

        message += "\n" + describe_plan(recipe)
    except Exception:  # noqa: BLE001 - the plan is a courtesy here; the stop itself must be reported
        pass
    remedies = []
    if not checkpointing and METHODS[recipe.method.name].can_checkpoint:
        remedies.append("set training.gradient_checkpointing: true")
    if training.micro_batch_size > 1:
        remedies.append(f"halve training.micro_batch_size to {training.micro_batch_size // 2} and double "
                        f"training.gradient_accumulation to {training.gradient_accumulation * 2} (same step)")
    remedies.append(f"lower dataset.max_length below {dataset.max_length}")
    if recipe.quantization is None:
        remedies.append("quantise the base: quantization: {bits: 4} (or method.name: qlora)")
    return OutOfMemory(message, hint="; then ".join(remedies) + " (`peftctl count-params --memory RECIPE` "
                       "shows the plan)")


def _gradient_checkpointing(recipe, device, data) -> bool:
    setting = recipe.training.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    from peftctl.plan import needs_checkpointing

    return needs_checkpointing(recipe, device)


def _autocast_dtype(recipe, device):
    import torch

    from peftctl.fast_path import autocast_name

    name = autocast_name(recipe, device.type)
    return getattr(torch, name) if name else None


def _start_loop_peak(device) -> int | None:
    """The peak of the setup (under FSDP every rank loads the whole base before sharding it), then a fresh
    high-water mark, so that the loop's own peak can be told apart from the load's."""
    import torch

    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _peak_since(device, setup_peak: int | None, *, loop_only: bool = False) -> int | None:
    """The peak of the whole run (setup included), or of the loop alone."""
    import torch

    if device.type != "cuda":
        return None
    loop_peak = torch.cuda.max_memory_allocated(device)
    return loop_peak if loop_only else max(loop_peak, setup_peak or 0)


def _rank_memory(device, setup_peak: int | None, rank: int) -> dict:
    return {"rank": rank, "peak_memory_bytes": _peak_since(device, setup_peak),
            "loop_peak_memory_bytes": _peak_since(device, setup_peak, loop_only=True)}


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _manifest(recipe, spec, data, counts, device, total_steps: int, checkpointing: bool, world, engine) -> dict:
    import peftctl

    return {
        "peftctl_version": peftctl.__version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "device": _device_name(device),
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


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _sayer(console, quiet: bool):
    def say(message: str) -> None:
        if quiet or console is None:
            return
        console.print(message, highlight=False, markup=False)
    return say


def _warn_special_text(data, say) -> None:
    stats = data.train.stats
    if stats.special_text_rows:
        say(f"warning: {stats.special_text_rows:,d} example(s) hold a special token's text in their own text (first: "
            f"{stats.special_text_examples[0]}); it is encoded as that control token, as the chat template does at "
            "inference. Clean the data if that is not meant (`peftctl inspect-data` lists them)")


def _dry_run_report(recipe, data, steps_per_epoch: int, total_steps: int, say) -> dict:
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


def _summary(result: RunResult, data, console, options: TrainOptions) -> None:
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
