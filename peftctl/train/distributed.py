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
from peftctl.model import base_model


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


def choose_engine(recipe, world: World, device) -> str | None:
    """ddp or fsdp for several processes (None for one). auto: ddp when the memory plan fits one GPU (and always
    for a quantised base, which FSDP2 cannot shard), fsdp otherwise."""
    if not world.distributed:
        return None
    setting = recipe.training.distributed
    if setting != "auto":
        return setting
    if recipe.quantization is not None or device.type != "cuda":
        return "ddp"
    from peftctl.plan import local_card, plan_memory

    plan = plan_memory(recipe, card=local_card(device))
    return "ddp" if plan.fits is not False else "fsdp"


def wrap(model, loss_fn, world: World, device, engine: str | None):
    """The module that computes a micro-batch's loss: "model + loss function" as one module, so that DDP or FSDP
    sees the whole forward that produces the loss (the fused loss calls the decoder directly, which a wrapper
    around the model alone would miss)."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_fn(self.model, batch)

    module = LossModule()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False)
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from peftctl.model import decoder_layers

        base = base_model(model)
        for layer in decoder_layers(base):  # one all-gather per layer, freed after it
            fully_shard(layer)
        fully_shard(module)  # the rest: embeddings, final norm, output head
    return module


def accumulating(module, engine: str | None, last: bool):
    """No gradient synchronisation on the micro-batches before the last of a step."""
    from contextlib import contextmanager, nullcontext

    if engine == "ddp" and not last:
        return module.no_sync()
    if engine == "fsdp":
        @contextmanager
        def fsdp_sync():
            module.set_requires_gradient_sync(last)
            yield
        return fsdp_sync()
    return nullcontext()


def full_trainable_state(model) -> dict:
    """Every trainable tensor in full, on the CPU (gathered from the shards under FSDP: call on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = tensor.detach().cpu().contiguous()
    return out


def load_trainable_state(model, state: dict) -> None:
    """Copy full tensors into the model's trainable parameters (re-sharding them under FSDP)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            param = params[name]
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements)
            param.copy_(tensor.to(param.device) if not hasattr(tensor, "device_mesh") else tensor)


def optimizer_state(model, optimizer, engine: str | None) -> dict:
    """The optimiser state to save: plain for one process or DDP; gathered in full (on rank 0) under FSDP."""
    if engine != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, engine: str | None) -> None:
    if engine != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


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
