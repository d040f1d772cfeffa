"""The card the plan is for: --gpu-memory, or the local GPU."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftctl.errors import InvalidInput
from peftctl.plan.constants import GiB, KiB, MiB


@dataclass
class Card:
    bytes: int | None
    name: str  # "NVIDIA H200", "--gpu-memory 24GiB", or why there is none

    @property
    def known(self) -> bool:
        return self.bytes is not None


_UNITS = {"": GiB, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "kb": 1000, "mb": 1000 ** 2,
          "gb": 1000 ** 3, "tb": 1000 ** 4, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}


def parse_gpu_memory(text: str) -> int:
    """'24GiB', '24 GB' (10^9), '80G' (GiB), '81559MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InvalidInput(f"--gpu-memory {text}: expected a size such as 24GiB, 80GB or 81559MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def card_from_option(text: str | None) -> Card:
    if text is not None:
        return Card(parse_gpu_memory(text), f"--gpu-memory {text.strip()}")
    return local_card()


def local_card(device=None) -> Card:
    import torch

    if not torch.cuda.is_available():
        return Card(None, "no GPU found here (give --gpu-memory, e.g. 24GiB)")
    device = device if device is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    return Card(int(props.total_memory), props.name)
