"""Resuming a run: a completed run is not trained again, the checkpoint to continue from, what changed since it
(refused before the model loads when it changes what is trained), and the restored state.
"""

from __future__ import annotations

import yaml

from peftctl.errors import DataError, InvalidInput
from peftctl.train import checkpoint as ckpt
from peftctl.train.run_folder import RunFolder


def check_recipe(path, recipe, say) -> None:
    """The checkpoint's recipe against this one: a change to what is trained is refused (it needs only the
    checkpoint's recipe.yaml, so it comes before the model loads); a change of cadence is a warning."""
    old_recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    trained, cadence = ckpt.recipe_differences(old_recipe, recipe.model_dump(mode="json"))
    if trained:
        raise InvalidInput(f"the recipe changed what is trained since {path.name}:\n  " + "\n  ".join(trained),
                           hint="resume with the recipe of that run (it is in the checkpoint as recipe.yaml), or "
                                "start a new run in another output.dir")
    for line in cadence:
        say(f"warning: changed since the checkpoint: {line}")


def completed_run(run: RunFolder, requested: str | None, recipe_yaml: str, say):
    """The manifest of a completed run that --resume auto names with the very same recipe, else None: nothing to
    redo (its final state is adapter/, not a checkpoint). A named checkpoint, or a changed recipe (more steps, say),
    goes the usual way through the checkpoints."""
    manifest = run.read_manifest()
    if requested is None or manifest.get("status") != "completed":
        return None
    try:
        if run.recipe.read_text() != recipe_yaml:
            return None
    except OSError:
        return None
    if requested != "auto":  # a checkpoint named on the command line: the user asks to train from it again
        say(f"note: the run in {run.path} is complete ({manifest.get('steps_done')} steps); training again from "
            f"{requested} as asked")
        return None
    say(f"the run in {run.path} is complete ({manifest.get('steps_done')} steps): nothing to resume")
    return manifest


def resume_point(run: RunFolder, requested: str | None, say):
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


def resume_record(run: RunFolder, checkpoint, step: int) -> dict:
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


def restore_state(path, model, optimizer, scheduler, data_fingerprint: str, world, say, *, engine=None):
    """The trainer state, weights, optimiser and schedule of the checkpoint (check_recipe ran before the model
    loaded); the data must be the same."""
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
