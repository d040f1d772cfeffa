"""`peftctl train`: from a validated recipe to a finished run folder.

Read it top to bottom: `train` (the folder's lock and the exit status around the run), `_train` (setup, the loop,
the end), then `setup`, which builds one `Run` in an order that matters (explained where it does), `run_steps` (the
loop: `forward_backward`, `clip_and_update` and `settle` make one optimiser step), `after_step` (log, evaluate, keep
the best, stop early, save), and `finish`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from peftctl.adapter_folder import ADAPTER_INFO
from peftctl.errors import (
    EXIT_OOM,
    EXIT_SIGTERM,
    InvalidInput,
    OutOfMemory,
    PeftctlError,
    TrainingStopped,
    sigterm_raises,
)
from peftctl.files import atomic_write_text, staged_dir
from peftctl.methods.registry import METHODS
from peftctl.train import checkpoint as ckpt, distributed, reports, resume
from peftctl.train.run_folder import RunFolder

KEPT_MATRICES = "dequantized_4bit_weights_kept"  # run.json's fast_path.kernels: quantization.keep_dequantized held

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


def _sigterm_raises():
    return sigterm_raises(lambda: TrainingStopped(
        "stopped by SIGTERM outside the training loop; no checkpoint was written for it", EXIT_SIGTERM,
        hint="the last checkpoint, if any, is intact: --resume auto continues"))


@dataclass
class Run:
    """One training run as `setup` builds it: what the loop, `after_step` and `finish` read and update."""

    loaded: object  # the LoadedRecipe (recipe, source, where a key was written)
    options: TrainOptions
    console: object
    say: Callable[[str], None]
    folder: RunFolder
    recipe_yaml: str
    world: object  # distributed.World: this process's rank among how many
    device: object
    tokenizer: object
    data: object
    schedule: object  # data.prepare.StepSchedule: which rows each optimiser step takes
    total_steps: int
    checkpointing: bool
    model: object
    step_module: object  # the model as the step calls it (DDP/FSDP wrapper, or the model's loss)
    eval_loss: Callable
    engine: str | None  # None, ddp or fsdp
    counts: object
    optimizer: object
    scheduler: object
    state: ckpt.TrainerState
    autocast_dtype: object
    scaler: object
    manifest: dict
    metrics: object | None  # rank 0 only
    t_start: float
    trainable: list = field(default_factory=list)
    # the loop's own bookkeeping
    train_s: float = 0.0
    last_loss: float | None = None
    last_eval: float | None = None
    nonfinite_in_a_row: int = 0
    first_step_s: float | None = None
    setup_peak: int | None = None
    t_loop: float = 0.0
    step_clock: object = None  # train/timings.StepClock: the time of a step whose update is queued on the device
    collector: object = None  # train/collector.SetupCollector: freezes setup's objects at the second step
    rng_ahead: tuple | None = None  # the random streams as the step being settled left them (run_steps)
    step_launched: int = 0  # the number of the step launched last (one past the settled steps when launched ahead)
    setup_clock: object = None  # train/timings.SetupClock: seconds per phase of setup

    @property
    def recipe(self):
        return self.loaded.recipe


@dataclass
class StepResult:
    loss: float  # per trained token, over every rank
    grad_norm: float
    tokens: int  # real tokens of the step's rows
    seconds: float
    stop_everywhere: bool  # a signal on any rank stops all ranks at this same step


def _train(loaded, options: TrainOptions, console=None):
    from peftctl.train.collector import SetupCollector
    from peftctl.train.timings import SetupClock, StepClock

    clock = SetupClock()  # before torch's import, which is part of the time to the first step
    with SetupCollector() as collector:  # no full collection until the second step (train/collector.py)
        import torch

        from peftctl.train.signals import graceful_stop

        run = setup(loaded, options, console, clock)
        if not isinstance(run, Run):
            return run  # the dry-run report, or a run that had already completed
        run.setup_peak = _start_loop_peak(run.device)
        run.t_loop = time.time()
        run.step_clock = StepClock(run.device)
        run.collector = collector
        batches = StepBatches(run.data, run.schedule, run.world, pin=run.device.type == "cuda")
        try:
            with graceful_stop() as stop, batches:
                if run.metrics is not None:
                    run.metrics.on_output_closed = stop.output_closed  # a broken pipe stops like a signal, exit 1
                run_steps(run, batches, stop)
        except TrainingStopped as e:
            _record_end(run, "stopped", e.exit_code)
            raise
        except KeyboardInterrupt:
            _record_end(run, "aborted", 130)
            raise
        except torch.OutOfMemoryError as e:
            _record_end(run, "failed", EXIT_OOM, error="out of GPU memory")
            raise _out_of_memory(run.recipe, max(run.state.step + 1, run.step_launched), run.checkpointing,
                                 kept_matrices=KEPT_MATRICES in run.manifest["fast_path"]["kernels"]) from e
        except BaseException as e:
            _record_end(run, "failed", getattr(e, "exit_code", 1), error=f"{type(e).__name__}: {e}"[:500])
            raise
        collector.thaw()  # the end may drop the model, whose cycles need the collector
        return finish(run)


def setup(loaded, options: TrainOptions, console=None, clock=None):
    """Everything before the first step, as one Run; or, without training, the dry-run report or the result of a
    run that had already completed. `clock` (train/timings.SetupClock) is told where the time goes."""
    from peftctl.train.timings import SetupClock

    clock = clock or SetupClock()
    import torch

    from peftctl import activation_checkpointing
    from peftctl.data.prepare import largest_micro_batch_rows, prepare
    from peftctl.host_embedding import place_input_embeddings
    from peftctl.methods import runtime
    from peftctl.methods.peft_common import AttachContext
    from peftctl.model import load_model, load_tokenizer, pick_device
    from peftctl.params import check_targets, count_parameters
    from peftctl.train import triton_key
    from peftctl.train.fused_lora import dropout_kernel_layers, fuse_lora_layers, keep_dequantized
    from peftctl.train.kernels import apply_fast_kernels, skip_adapter_input_casts
    from peftctl.train.loss import build_loss
    from peftctl.train.metrics import Metrics
    from peftctl.train.optim import build_optimizer, build_scheduler
    from peftctl.train.trackers import Trackers, check_available as check_trackers

    clock.mark("imports")
    recipe, t_start = loaded.recipe, time.time()
    spec = METHODS[recipe.method.name]
    training = recipe.training
    say = _sayer(console, options.quiet)
    folder = RunFolder(recipe.output.dir)
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    world = distributed.from_environment()
    device = distributed.init(world) if world.distributed else None  # the collectives below need the process group
    if not world.main:
        say = _sayer(None, True)  # one voice: rank 0 reports for all

    # The run folder is claimed before anything slow, so a wrong output.dir fails in a second, not after loading.
    if not options.dry_run:
        check_trackers(recipe.output.trackers)  # a missing extra fails now, not after the model has loaded
        distributed.on_main(world, lambda: folder.claim(resume=options.resume is not None, force=options.force,
                                                        inputs=_input_paths(recipe)))
        done = resume.completed_run(folder, options.resume, recipe_yaml, say)
        if done is not None:
            final = done.get("final") or {}
            return RunResult(str(folder.path), done.get("steps_done") or 0, final.get("train_loss"),
                             final.get("eval_loss"), done.get("tokens_per_s") or 0.0)
    resume_from = resume.resume_point(folder, options.resume, say)
    if resume_from is not None:
        resume.check_recipe(resume_from, recipe, say)  # a refusal needs no model: before anything loads
    clock.mark("run_folder")

    # The tokenizer comes first: the data needs it, and a dry run stops after the data without loading weights.
    tokenizer = load_tokenizer(recipe.model, base_dir=loaded.base_dir)
    clock.mark("tokenizer")
    data = _prepare_everywhere(world, lambda: prepare(recipe.dataset, tokenizer, seed=training.seed,
                                                      pad_id=tokenizer.pad_token_id))
    reports.warn_special_text(data, say)
    if recipe.evaluation is not None and world.main:
        from peftctl.eval.in_training import check_before_training

        check_before_training(recipe, tokenizer)  # bad evaluation data stops the run now, not after training
    for warning in data.warnings:
        say(f"warning: {warning}")

    # The number of steps comes from the data; the schedule needs it, so the optimiser is built after the data.
    schedule = data.step_schedule(training, world.size)
    total_steps = training.max_steps or schedule.total(training.epochs)
    clock.mark("data")
    if options.dry_run:
        return reports.dry_run_report(recipe, data, schedule.steps_in(0), total_steps, say)

    device = device or pick_device()
    key_thread = triton_key.start(device.type)  # Triton's cache key while the model loads (train/triton_key.py)
    checkpointing, dropout_kernel, keep_matrices = _memory_mode(recipe, device)
    clock.mark("memory_plan")  # gradient_checkpointing: auto asks the plan (a meta model) on a GPU
    _seed_everything(training.seed)  # before the adapter exists: its initial weights come from this seed
    # One process recomputes through the reentrant checkpoint where a layer's call allows it (less host time a
    # step); DDP and FSDP need the non-reentrant form (peftctl/activation_checkpointing.py).
    model = load_model(recipe, device, gradient_checkpointing=checkpointing,
                       reentrant=activation_checkpointing.reentrant_for(world))
    clock.mark("model_load")
    packed_before = data.packed
    data, attention = _settle_packing(model, recipe, data, tokenizer, world, device, say)
    if data.packed != packed_before:  # one example a row after all: the step schedule follows the new rows
        schedule = data.step_schedule(training, world.size)
        total_steps = training.max_steps or schedule.total(training.epochs)
    clock.mark("packing_check")
    kernels = apply_fast_kernels(model, device)  # before the adapter: peft then wraps the patched layers as usual
    clock.mark("kernels")
    check_targets(model, recipe.method, loaded.where("method.targets"))  # peft skips a name that matches nothing
    model = runtime.attach(model, recipe.method, AttachContext(tokenizer_path=recipe.model.name,
                                                               tokenizer_revision=recipe.model.revision,
                                                               where=loaded.where("method.targets")))
    for note in getattr(model, "peftctl_notes", []):
        say(f"note: {note}")
    if recipe.method.init_from:
        runtime.initialise_from(model, recipe.method, recipe.method.init_from)
        say(f"starting from the adapter in {recipe.method.init_from}")
    if fuse_lora_layers(model, dropout_kernel=dropout_kernel):
        kernels = kernels + ["fused_lora_branch"]
    if keep_matrices and keep_dequantized(model, True):
        kernels = kernels + [KEPT_MATRICES]
    # After the adapter: peft must see the model's own embedding (to wrap or tie it), and the hooks peft put on it
    # move with it. Before the loss, which reads the head, and before the parameters are counted.
    embeddings_on_host = place_input_embeddings(
        model, recipe.model.input_embeddings, device, world_size=world.size, quantised=recipe.quantization is not None,
        checkpointing=checkpointing, prompt_learning=spec.prompt_learning, where=loaded.where("model.input_embeddings"))
    clock.mark("attach")
    model.train()
    loss_fn, loss_name = build_loss(model, spec, device, checkpointing=checkpointing)
    engine = distributed.choose_engine(recipe, world, device)  # None, ddp or fsdp
    step_module = distributed.wrap(model, loss_fn, world, device, engine)
    # Evaluation: through the sharded module under FSDP (its forward gathers the weights); around DDP's wrapper
    # otherwise, since rank 0 evaluates alone and DDP's forward would wait for the others.
    eval_loss = (lambda m, batch: step_module(batch)) if engine == "fsdp" else loss_fn
    counts = count_parameters(model)
    say(counts.line())
    clock.mark("loss_and_wrap")

    optimizer = build_optimizer(model, recipe, device)
    scheduler = build_scheduler(optimizer, training, total_steps)
    state = ckpt.TrainerState()
    if resume_from is not None:
        state = resume.restore_state(resume_from, model, optimizer, scheduler, data.fingerprint, world, say,
                                     engine=engine)

    clock.mark("optimizer")
    autocast_dtype = _autocast_dtype(recipe, device)
    if autocast_dtype is not None and skip_adapter_input_casts(model):
        kernels = kernels + ["adapter_inputs_in_autocast_dtype"]
    rows = largest_micro_batch_rows(training, recipe.dataset.max_length)  # as the plan sizes it
    if dropout_kernel_layers(model, device.type, autocast_dtype, rows * recipe.dataset.max_length):
        kernels = kernels + ["lora_dropout_kernel"]
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    manifest = reports.manifest(recipe, spec, data, counts, device, total_steps, checkpointing, world, engine)
    manifest["fast_path"] = {"kernels": kernels, "loss": loss_name, "autocast": str(autocast_dtype),
                             "attention": attention,
                             "input_embeddings": "cpu" if embeddings_on_host or device.type == "cpu" else "gpu",
                             "triton_key_in_background": key_thread is not None,
                             "activation_checkpointing": activation_checkpointing.form(model)}
    if resume_from is not None and world.main:
        manifest["resume"] = resume.resume_record(folder, resume_from, state.step)
    metrics = None
    if world.main:
        folder.clear_previous()  # --force: the old run goes only now, after the data and the model have loaded
        folder.write_manifest({**manifest, "status": "running"})
        atomic_write_text(folder.recipe, recipe_yaml)
        trackers = Trackers(recipe.output.trackers, folder.path, recipe, resume_step=state.step)
        metrics = Metrics(folder.metrics, total_steps=total_steps, log_format=options.log_format,
                          quiet=options.quiet, trackers=trackers, resume_step=state.step)
    if key_thread is not None:
        key_thread.join()  # done long before, as a rule; never computed twice at once
    clock.mark("run_files")
    return Run(loaded, options, console, say, folder, recipe_yaml, world, device, tokenizer, data, schedule,
               total_steps, checkpointing, model, step_module, eval_loss, engine, counts, optimizer, scheduler,
               state, autocast_dtype, scaler, manifest, metrics, t_start,
               trainable=[p for p in model.parameters() if p.requires_grad], setup_clock=clock)


def _settle_packing(model, recipe, data, tokenizer, world, device, say):
    """The attention kernel of packed rows (probed on the run's shapes) and the check that packed examples stay
    apart through it. Returns the data (re-prepared one example a row when the model leaks and the recipe says
    `packing: auto`) and run.json's fast_path.attention record."""
    from peftctl import packed_attention
    from peftctl.data.prepare import prepare
    from peftctl.model import check_packing_isolation

    loaded_with = model.config._attn_implementation
    # Rows of one example each (examples as long as a row) keep apart whatever the kernel: nothing to probe.
    shares_rows = data.shares_rows
    attention = packed_attention.choose_for_run(model, recipe, device, packed=shares_rows, say=say)
    if not shares_rows:
        return data, attention
    isolated, difference, contamination = check_packing_isolation(model, device, len(tokenizer))
    if not isolated and attention["kernel"] != loaded_with:
        # The kernel passed its probe but the model does not hand it the documents' lengths: back to the kernel
        # it was loaded with, checked again.
        why = f"the model leaks across packed examples with it (difference {difference:.3g})"
        say(f"note: packed attention: {attention['kernel']} refused: {why}")
        attention = packed_attention.unchoose(model, attention, loaded_with, why)
        isolated, difference, contamination = check_packing_isolation(model, device, len(tokenizer))
    if isolated:
        return data, attention
    if recipe.dataset.packing != "auto":
        raise InvalidInput(f"{model.config.model_type}: this model's attention does not keep packed examples "
                           f"apart (difference {difference:.3g} against {contamination:.3g} unpacked)",
                           hint="set dataset.packing: auto (falls back to one example a row) or false, or "
                                "model.attn_implementation to sdpa or eager")
    # Unpacked rows train the same examples; only packing's speed is lost.
    say(f"note: {model.config.model_type}'s attention does not keep packed examples apart: one example a row "
        "(dataset.packing: auto)")
    unpacked = recipe.dataset.model_copy(update={"packing": False})
    training = recipe.training
    return _prepare_everywhere(world, lambda: prepare(unpacked, tokenizer, seed=training.seed,
                                                      pad_id=tokenizer.pad_token_id)), attention


def _prepare_everywhere(world, prepare_data):
    """Rank 0 tokenises first; the others then read its cache instead of all writing it at once."""
    data = distributed.on_main(world, prepare_data)
    return data if world.main else prepare_data()


@dataclass
class Launched:
    """A step whose forward and backward passes are launched: its rows (and where they come from), its loss on the
    device beside the stop flag, and, once clipped, its values (with the gradient norm) and whether its update is
    queued."""

    epoch: int
    step_in_epoch: int
    step_rows: list
    n_trained: int
    step_loss: object  # [summed token loss, stop requested], on the device
    t_begin: float  # the host's clock
    begin: object = None  # the step clock's mark (a queued update's step is timed by it)
    queued: bool = False
    values: object = None  # [loss, gradient norm, stop flag] on the device, once clipped
    readout: object = None  # a queued step's values, on their way to the host
    end: object = None  # the step clock's mark after the readout's copy


def run_steps(run: Run, batches, stop) -> None:
    """The loop: optimiser steps until max_steps, an early stop, or a stop request.

    Where the update is queued on the device (`_queue_update`), the host reads a step's loss only after it has
    launched the next step's forward and backward passes: the GPU then goes from one step's update straight into
    the next step's work while the host logs, and the step's boundary no longer idles the GPU (measured on an 8B
    model: 7-10 ms a step, 1.5-2%). Nothing else changes: the next step's update is queued only after this step is
    settled (its learning rate follows whether this one counted), and a checkpoint of this step holds the random
    streams as this step left them (`rng_ahead`). A step whose settling may evaluate or save (eval_every,
    save_every, the last), and the process's first, is settled before the next one starts. Such a step's time is
    measured on the device's clock (train/timings.StepClock), so no step's time includes another's work.
    Elsewhere (GradScaler, FSDP, optimisers without `found_inf`) the update waits for the host: step by step."""
    pending = None  # launched and queued up to its update; its loss not read yet
    while True:
        launched = None
        if run.state.step + (pending is not None) < run.total_steps:
            if pending is not None:
                run.rng_ahead = ckpt.rng_snapshot()
            launched = forward_backward(run, batches, after=pending)
        if pending is not None:
            step = settle(run, pending)
            stopping = step is not None and after_step(run, step, stop)
            run.rng_ahead = None
            if stopping:
                break
        if launched is None:
            break
        clip_and_update(run, launched, stop)
        if run.collector is not None and run.first_step_s is not None:
            run.collector.freeze_setup()  # once, at the second step: while the device runs it (train/collector.py)
        pending = launched if launched.queued and _light_boundary(run) else None
        if pending is None:
            step = settle(run, launched)
            if step is not None and after_step(run, step, stop):
                break
    run.optimizer.zero_grad(set_to_none=True)  # a step launched past an early stop leaves its gradients


def _light_boundary(run: Run) -> bool:
    """Whether the step just launched, if it counts, settles with no evaluation or save: then the next step may be
    launched before it is settled. The process's first step is settled at once: its line is the first sign of
    life a user (and the time to the first step) waits for."""
    number, training = run.state.step + 1, run.recipe.training
    evaluates = run.data.validation is not None and number % training.eval_every == 0
    return not (run.first_step_s is None or evaluates or number % training.save_every == 0
                or number >= run.total_steps)


def forward_backward(run: Run, batches, after: Launched | None = None) -> Launched:
    """A step's micro-batches, forward and backward, on the rows after `after` (launched, not yet settled) or
    after the last settled step."""
    import torch

    state, world, device = run.state, run.world, run.device
    epoch, step_in_epoch = (after.epoch, after.step_in_epoch + 1) if after else (state.epoch, state.step_in_epoch)
    if step_in_epoch >= run.schedule.steps_in(epoch):
        epoch, step_in_epoch = epoch + 1, 0
    run.step_launched = state.step + 1 + (after is not None)
    t_begin, begin = time.perf_counter(), run.step_clock.mark() if run.step_clock else None
    # This step's rows and micro-batches (collated in the background while the previous step ran). The step's loss
    # is normalised by all its trained tokens -- on every rank, counted on the host from the row lengths, with no
    # device sync. Each rank takes every world.size-th row.
    step_rows, micro_batches = batches.get(epoch, step_in_epoch)
    n_trained = max(1, run.data.trained_tokens(run.data.train, step_rows))
    # DDP averages gradients over the ranks; scaling by world.size turns that average into the sum.
    scale = world.size / n_trained
    step_loss = torch.zeros(2, device=device)  # [summed token loss, stop requested]
    for i, mb in enumerate(micro_batches):
        mb = mb.to(device)
        last = i == len(micro_batches) - 1
        with distributed.accumulating(run.step_module, run.engine, last):
            with torch.autocast(device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
                token_loss = run.step_module(mb)
            scaled = token_loss * scale
            (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        step_loss[0] += token_loss.detach()
    return Launched(epoch, step_in_epoch, step_rows, n_trained, step_loss, t_begin, begin)


def clip_and_update(run: Run, launched: Launched, stop) -> None:
    """One reduction over the ranks, clipping, and the update where the device can skip it by itself."""
    import torch

    step_loss = launched.step_loss
    # The stop flag is read here, not at the launch: a step launched ahead is clipped after the previous step has
    # settled and logged, so a stop that came meanwhile (a signal, a closed pipe) stops the run at this step.
    # fill_ takes the flag as a kernel argument. An indexed assignment (`step_loss[1] = flag`) copies it from pageable
    # host memory, which waits for the whole backward pass to finish: the host then launched clipping and the update
    # into an idle GPU (measured: about 4 ms of idle a step on an 8B model).
    step_loss[1].fill_(float(stop.requested))
    distributed.all_sum(run.world, step_loss)  # one collective: the global loss, and whether any rank must stop
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.recipe.training.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm comes back as a (replicated) DTensor
        grad_norm = grad_norm.full_tensor()
    step_loss[0] /= launched.n_trained
    launched.values = torch.stack([step_loss[0], grad_norm.float(), step_loss[1]])
    launched.queued = _queue_update(run, step_loss[0], grad_norm)
    if launched.queued and run.step_clock is not None:
        # The step's three values travel to the host now, behind its update, and the host waits for that copy
        # alone. Read with `.tolist()` later, they would wait for everything queued by then: with the next step
        # launched ahead, its whole backward pass.
        launched.readout = torch.empty(3, pin_memory=run.device.type == "cuda")
        launched.readout.copy_(launched.values, non_blocking=True)
        launched.end = run.step_clock.mark()


def settle(run: Run, launched: Launched) -> StepResult | None:
    """The host's side of a step: its one sync (loss, gradient norm and stop flag together), the update where it
    waited for that, the schedule, the counters. None when a non-finite step was skipped: never step on (or save)
    non-finite values."""
    state = run.state
    if launched.readout is not None:
        seconds = run.step_clock.seconds(launched.begin, launched.end)  # waits for the readout's copy
        loss_value, norm_value, stop_flag = launched.readout.tolist()
    else:
        loss_value, norm_value, stop_flag = launched.values.tolist()
        seconds = time.perf_counter() - launched.t_begin
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        _skip_nonfinite(run, "loss" if not math.isfinite(loss_value) else "gradient norm", launched)
        return None
    run.nonfinite_in_a_row = 0
    if not launched.queued:
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()  # the next step's rate: only after a step that counted
    state.step += 1
    state.epoch, state.step_in_epoch = launched.epoch, launched.step_in_epoch + 1
    step_tokens = run.data.real_tokens(run.data.train, launched.step_rows)
    state.tokens_seen += step_tokens
    state.trained_tokens_seen += launched.n_trained
    run.train_s += seconds
    run.first_step_s = run.first_step_s or (time.time() - run.t_loop)
    return StepResult(loss_value, norm_value, step_tokens, seconds, stop_flag > 0)


def _queue_update(run: Run, loss, grad_norm) -> bool:
    """Queue the optimiser's update before the step's host sync, where the optimiser can skip a non-finite update on
    the device: torch's fused AdamW reads `found_inf` and then leaves the weights, its moments and its step count as
    they were. The GPU then goes from the backward pass straight into the update instead of idling while the host
    waits for the loss and only then launches the update (milliseconds a step with hundreds of adapter tensors).
    False where the update must wait for the host's check: GradScaler, bitsandbytes' optimisers, the CPU's AdamW
    (not fused: optim.py fuses on CUDA), and FSDP, whose sharded (DTensor) parameters would meet a plain `found_inf`
    tensor in the fused kernel -- a mix no multi-GPU run here has checked."""
    import torch

    optimizer = run.optimizer
    if (run.scaler is not None or run.engine == "fsdp"
            or not all(group.get("fused") for group in optimizer.param_groups)):
        return False
    bad = torch.logical_not(torch.isfinite(loss) & torch.isfinite(grad_norm))
    optimizer.found_inf = bad.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    return True


def _skip_nonfinite(run: Run, kind: str, launched: Launched) -> None:
    """Drop a step whose loss or gradient norm is not finite, or stop (with the last good state saved) when the
    recipe says so or too many came in a row. A queued update skipped itself on the device and cleared its
    gradients (those there now may be the next step's)."""
    state, training = run.state, run.recipe.training
    if not launched.queued:
        run.optimizer.zero_grad(set_to_none=True)
    run.nonfinite_in_a_row += 1
    what = f"non-finite {kind} at step {state.step + 1}"
    if training.on_nonfinite == "stop" or run.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        if state.step > 0:
            save_checkpoint(run)
        raise PeftctlError(f"{what}; stopped with the last good state saved (step {state.step})",
                           hint="lower training.learning_rate, keep training.max_grad_norm set, use bfloat16 "
                                "instead of float16, or set training.on_nonfinite: skip")
    state.nonfinite_skipped += 1
    state.epoch, state.step_in_epoch = launched.epoch, launched.step_in_epoch + 1  # the batch is dropped, data moves on
    run.say(f"warning: {what}; batch skipped ({run.nonfinite_in_a_row} in a row)")


def after_step(run: Run, step: StepResult, stop) -> bool:
    """Log, evaluate, keep the best, stop early, save. True when training stops early (patience ran out)."""
    state, training, world = run.state, run.recipe.training, run.world
    if world.main and (state.step % training.log_every == 0 or state.step == run.total_steps):
        run.last_loss = step.loss
        run.metrics.log({"step": state.step, "epoch": state.epoch, "loss": run.last_loss,
                         "lr": run.scheduler.get_last_lr()[0], "grad_norm": step.grad_norm,
                         "tokens": step.tokens, "tokens_per_s": step.tokens / max(step.seconds, 1e-9),
                         "elapsed_s": round(time.time() - run.t_start, 2)})
    improved = stop_early = False
    if run.data.validation is not None and (state.step % training.eval_every == 0 or state.step == run.total_steps):
        improved, stop_early = _validate(run)
        if training.keep_best and improved and state.step < run.total_steps and not step.stop_everywhere:
            save_checkpoint(run)  # the best so far; pruning keeps it beside the newest
    if stop_early:
        run.say(f"stopping early at step {state.step}: no better validation loss for {training.patience} "
                f"evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})")
        return True
    if step.stop_everywhere:
        path = save_checkpoint(run)
        raise TrainingStopped(f"stopped by {stop.name} at step {state.step}; checkpoint {path}",
                              stop.exit_code if stop.requested else EXIT_SIGTERM,
                              hint=f"continue with: peftctl train {run.loaded.source} --resume auto")
    if state.step % training.save_every == 0 and state.step < run.total_steps and not (
            training.keep_best and improved):
        save_checkpoint(run)
    return False


def _validate(run: Run) -> tuple[bool, bool]:
    """The validation loss, logged; (improved on the best, patience ran out) -- the same on every rank."""
    state, training, world = run.state, run.recipe.training, run.world
    if world.main or run.engine == "fsdp":  # a sharded model needs every rank for a forward pass
        run.last_eval = evaluate(run.model, run.data, training.micro_batch_size, run.device, run.autocast_dtype,
                                 run.eval_loss)
    if world.main:
        run.metrics.log({"step": state.step, "eval_loss": run.last_eval, "eval_ppl": _ppl(run.last_eval)})
    run.last_eval = distributed.broadcast_object(world, run.last_eval)  # every rank decides the same below
    improved = state.best_eval_loss is None or run.last_eval < state.best_eval_loss
    if improved:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = run.last_eval, state.step, 0
        return True, False
    state.evals_without_improvement += 1
    return False, bool(training.patience) and state.evals_without_improvement >= training.patience


def save_checkpoint(run: Run):
    """Collectives first, on every rank: the full weights and optimiser state (gathered under FSDP) and every
    rank's random streams (for an exact resume); then rank 0 writes."""
    weights = distributed.full_trainable_state(run.model)
    optimizer_state = distributed.optimizer_state(run.model, run.optimizer, run.engine)
    rngs = distributed.gather_objects(run.world, ckpt.rng_state(run.rng_ahead))
    path = None
    if run.world.main:
        training = run.recipe.training
        path = ckpt.save(run.folder.checkpoints, weights, optimizer_state, run.scheduler, run.state,
                         run.recipe_yaml, run.data.fingerprint, training.keep_checkpoints, rngs=rngs,
                         world_size=run.world.size, engine=run.engine)
    distributed.barrier(run.world)
    return path


def _record_end(run: Run, status: str, exit_code: int, **extra) -> None:
    """run.json, metrics.jsonl and loss.png as the run ends, however it ends (rank 0)."""
    from peftctl.train.metrics import plot_loss

    if not run.world.main:
        return
    state, manifest = run.state, run.manifest
    run.metrics.final({"status": status, "exit_code": exit_code, "run_dir": str(run.folder.path),
                       "steps_done": state.step, **({"error": extra["error"]} if "error" in extra else {})})
    run.metrics.close(status)
    plot_loss(run.metrics.records, run.folder.loss_plot)
    timings = {"total_s": round(time.time() - run.t_start, 2), "train_s": round(run.train_s, 2),
               "setup_s": round(run.t_loop - run.t_start, 2),
               "first_step_s": round(run.first_step_s, 2) if run.first_step_s else None,
               "train_s_all_attempts": round(run.train_s + manifest.get("resume", {}).get("earlier_train_s", 0), 2),
               "setup_phases": run.setup_clock.as_dict()}
    fast_path = manifest.get("fast_path") or {}
    if fast_path.get("activation_checkpointing"):
        from peftctl import activation_checkpointing

        manifest = {**manifest, "fast_path": {
            **fast_path, "activation_checkpointing_calls": activation_checkpointing.forms_taken(run.model)}}
    run.folder.write_manifest({**manifest, **extra, "status": status, "exit_code": exit_code,
                               "steps_done": state.step, "tokens_seen": state.tokens_seen, "timings": timings,
                               "peak_memory_bytes": _peak_since(run.device, run.setup_peak),
                               "nonfinite_skipped": state.nonfinite_skipped})


def finish(run: Run):
    """The end: the adapter (the best one with keep_best; with its tokenizer and chat template), run.json, then the
    merged model and the evaluation when the recipe asks for them."""
    from peftctl.train.fused_lora import keep_dequantized

    recipe, state, world, folder = run.recipe, run.state, run.world, run.folder
    keep_dequantized(run.model, False)  # their memory first: the merge and the evaluation load models of their own
    tokens_per_s = state.tokens_seen / run.train_s if run.train_s else 0.0
    adapter_step = state.step
    if recipe.training.keep_best and state.best_step is not None and state.best_step != state.step:
        ckpt.load_adapter_weights(folder.checkpoints / ckpt.name_for(state.best_step), run.model)
        adapter_step = state.best_step
    weights = distributed.full_trainable_state(run.model)  # gathered on every rank under FSDP
    # Every rank's peak, not rank 0's alone: ranks differ (FSDP shards, rank 0 also evaluates and saves).
    memory_per_rank = distributed.gather_objects(world, _rank_memory(run.device, run.setup_peak, world.rank))
    if world.main:
        spec = METHODS[recipe.method.name]
        save_adapter(run.model, spec, recipe, run.tokenizer, folder,
                     loraplus=getattr(recipe.method, "loraplus_lr_ratio", None), weights=weights)
        serving = reports.serving(folder, run.model, recipe, run.say)
        _record_end(run, "completed", 0, final={"train_loss": run.last_loss, "eval_loss": run.last_eval},
                    tokens_per_s=round(tokens_per_s), adapter_step=adapter_step,
                    best={"step": state.best_step, "eval_loss": state.best_eval_loss},
                    stopped_early=state.step < run.total_steps, serving=serving, memory_per_rank=memory_per_rank)
    distributed.barrier(world)
    distributed.close(world)
    if recipe.output.merge and world.main:
        _merge(folder, recipe, run.say)
    evaluation = None
    if recipe.evaluation is not None and world.main:
        from peftctl.eval.in_training import evaluate_run

        evaluation = evaluate_run(recipe, folder, run.say)
        folder.write_manifest({**folder.read_manifest(), "evaluation": evaluation})
    result = RunResult(str(folder.path), state.step, run.last_loss, run.last_eval, tokens_per_s,
                       {"trainable": run.counts.trainable, "total": run.counts.total}, evaluation)
    if world.main:
        reports.summary(result, run.data, run.console, run.options)
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
            "trust_remote_code": recipe.model.trust_remote_code, "dtype": recipe.model.dtype,
            "quantization": quant.model_dump() if quant else None,
            "loraplus_lr_ratio": loraplus, "can_merge": spec.can_merge,
            "prompt_format": recipe.dataset.sources()[0].format}  # what `peftctl generate` wraps prompts in
    with staged_dir(run.adapter) as tmp:
        runtime.save(model, spec, tmp, state_dict=weights)
        tokenizer.save_pretrained(str(tmp))
        save_generation_config(model, tokenizer, tmp)  # the chat template's end-of-turn among the stop tokens
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _merge(run: RunFolder, recipe, say) -> None:
    """output.merge: after training completed; a merge that fails makes the run a failure in run.json too (the
    adapter stays: `peftctl merge RUN --out DIR` retries)."""
    from peftctl.merge import merge_adapter

    try:
        merge_adapter(run.adapter, run.merged, force=True, report=say)
    except BaseException as e:
        error = f"{type(e).__name__}: {getattr(e, 'message', None) or e}"[:500]
        run.write_manifest({**run.read_manifest(), "status": "failed", "exit_code": getattr(e, "exit_code", 1),
                            "error": error, "merge": {"error": error}})
        raise


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


def _out_of_memory(recipe, step: int, checkpointing: bool, *, kept_matrices: bool = False) -> OutOfMemory:
    """The message for an out-of-memory stop: the shapes that caused it, the plan, and the remedies in order (the
    kept 4-bit matrices first: they cost memory for speed alone)."""
    training, dataset = recipe.training, recipe.dataset
    message = (f"out of GPU memory at step {step}: micro_batch_size {training.micro_batch_size} x max_length "
               f"{dataset.max_length} tokens, gradient checkpointing {'on' if checkpointing else 'off'}")
    try:
        from peftctl.plan import describe_plan

        message += "\n" + describe_plan(recipe)
    except Exception:  # noqa: BLE001 - the plan is a courtesy here; the stop itself must be reported
        pass
    remedies = ["set quantization.keep_dequantized: false"] if kept_matrices else []
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


def _memory_mode(recipe, device) -> tuple[bool, bool, bool]:
    """(gradient checkpointing, LoRA's dropout kernel, kept dequantised 4-bit matrices): the plan decides them on a
    GPU (plan.memory_mode); elsewhere only what the recipe asks for explicitly."""
    setting = recipe.training.gradient_checkpointing
    if device.type != "cuda":
        from peftctl.fast_path import keep_dequantized_setting

        return setting is True, False, keep_dequantized_setting(recipe) is True
    from peftctl.plan import memory_mode

    return memory_mode(recipe, device)


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


def _sayer(console, quiet: bool):
    def say(message: str) -> None:
        if quiet or console is None:
            return
        console.print(message, highlight=False, markup=False)
    return say
