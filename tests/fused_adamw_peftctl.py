"""`peftctl` with torch's fused AdamW on the CPU, as the loop gets it on a GPU: the update is then queued on the
device and steps are launched ahead of the previous step's settle (peftctl/train/loop.py). Each rank writes how
its steps were launched to $PEFTCTL_TEST_LAUNCHES.<rank> (true: launched ahead). Run by tests/test_distributed.py
under torchrun."""

import json
import os

from conftest import fused_adamw  # this folder is on sys.path: the program runs as a script from it
from peftctl.train import loop, optim

_launch, _launches = loop.forward_backward, []


def launching(run, batches, after=None):
    _launches.append(after is not None)
    return _launch(run, batches, after)


optim.build_optimizer, loop.forward_backward = fused_adamw(optim.build_optimizer), launching
if __name__ == "__main__":
    from peftctl.cli.app import main

    try:
        main()
    finally:
        with open(f"{os.environ['PEFTCTL_TEST_LAUNCHES']}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(_launches, f)
