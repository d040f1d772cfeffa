"""Experiment trackers: TensorBoard, Weights & Biases, MLflow -- each only when the recipe lists it in
output.trackers, so nothing leaves the machine unasked. W&B and MLflow are optional extras."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftctl.errors import InvalidInput

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_available(names: list[str]) -> None:
    """Fail before anything slow when a listed tracker's package is missing (exit 2 with the pip command)."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise InvalidInput(f"output.trackers lists {name}, but the {PACKAGES[name]} package is not installed",
                               hint=f"pip install 'peftctl[{name}]' (or pip install {PACKAGES[name]}), or remove "
                                    f"{name} from output.trackers")


class Trackers:
    def __init__(self, names: list[str], run_dir: Path, recipe, *, resume_step: int = 0):
        check_available(names)
        output = recipe.output
        run_name = output.run_name or Path(run_dir).name
        config = recipe.model_dump(mode="json")
        self._tensorboard = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                              purge_step=resume_step + 1 if resume_step else None)
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(project=output.project or "peftctl", name=run_name, tags=list(output.tags),
                                     config=config, dir=str(run_dir), resume="allow" if resume_step else None)
        if "mlflow" in names:
            import mlflow

            mlflow.set_experiment(output.project or "peftctl")
            self._mlflow = mlflow.start_run(run_name=run_name, tags={t: "" for t in output.tags})
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, record: dict) -> None:
        step = record["step"]
        values = {k.replace("eval_", "eval/"): v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self, status: str = "completed") -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if status == "completed" else 1)
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run(status="FINISHED" if status == "completed" else "FAILED")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
