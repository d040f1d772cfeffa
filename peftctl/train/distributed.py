"""Several processes through torch.distributed: torchrun's environment, DDP, and the `--gpus N` launcher.

The same recipe runs on one process or many. Every rank reads the same data in the same global order; a step
takes micro_batch_size x gradient_accumulation x world_size rows, and each rank computes its share of the
micro-batches. Rank 0 alone logs, evaluates and writes the run folder.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from peftctl.errors import EXIT_FAILURE, InvalidInput


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """The world torchrun describes in WORLD_SIZE / RANK / LOCAL_RANK (a single process otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World):
    """Join the process group; returns this rank's device."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size,
                                device_id=device if device.type == "cuda" else None)
    return device


def close(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(world: World, tensor):
    """Sum a small tensor over the ranks, in place (one collective)."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(world: World, value) -> list:
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(world: World, value):
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(world: World, fn):
    """Run `fn` on rank 0 alone; its error, if any, is raised on every rank, so none waits forever for it.
    Returns fn's result on rank 0 and None elsewhere."""
    from peftctl.errors import PeftctlError

    if not world.distributed:
        return fn()
    result, failure = None, None
    if world.main:
        try:
            result = fn()
        except PeftctlError as e:
            failure = (type(e).__name__, e.message, e.hint, e.exit_code)
            error = e
        except BaseException as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised here
            failure = ("PeftctlError", f"rank 0 failed: {type(e).__name__}: {e}", None, EXIT_FAILURE)
            error = e
    failure = broadcast_object(world, failure)
    if failure is not None:
        if world.main:
            raise error
        error = PeftctlError(failure[1], failure[2])
        error.exit_code = failure[3]
        raise error
    barrier(world)
    return result


class LossModule:
    """Wraps "model + loss function" as one module so that DDP sees the whole forward that produces the loss
    (the fused loss calls the decoder directly, which a DDP wrapper around the model alone would miss)."""

    @staticmethod
    def wrap(model, loss_fn, world: World, device):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        class _Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, batch):
                return loss_fn(self.model, batch)

        module = _Loss()
        if not world.distributed:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False)


def launch(args: list[str], processes: int) -> int:
    """`peftctl train --gpus N`: start N ranks of this same command through torchrun's launcher; exit with the
    ranks' exit code (130/143 after a signal, 3 for out of memory)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise InvalidInput(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id="peftctl",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "peftctl", "train", *args)
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        return _worst(codes)
    except Exception as e:  # noqa: BLE001 - the launcher's own signal handling raises SignalException
        if type(e).__name__ == "SignalException":
            import signal

            return 128 + int(getattr(e, "sigval", signal.SIGTERM))
        raise
    return 0


def _worst(codes: list[int]) -> int:
    """The exit code that tells the most: a signal or out-of-memory over a plain failure."""
    for preferred in (3, 143, 130, 2):
        if preferred in codes:
            return preferred
    nonzero = [c for c in codes if c]
    if not nonzero:
        return 0
    code = nonzero[0]
    return 128 - code if code < 0 else (code or EXIT_FAILURE)  # a negative code is "killed by signal -code"
