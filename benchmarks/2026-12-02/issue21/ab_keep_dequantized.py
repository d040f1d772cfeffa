"""Case 3 (8B QLoRA all-linear, 4 x 2048) through `peftctl train` with quantization.keep_dequantized false and
auto, in fresh processes taking turns, on the recipe and model scripts/bench.py left in its work folder
(`--work DIR --keep-work`): the median step of each launch (steps 4 on, past the warm-up) and its loop peak.

    python benchmarks/2026-12-02/issue21/ab_keep_dequantized.py WORK_DIR ROUNDS [OUT_JSON]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ab_checkouts import take_turns  # beside this script: fresh `peftctl train` processes taking turns


def main() -> None:
    sides = {keep: {"sets": (f"quantization.keep_dequantized={keep}",)} for keep in ("false", "auto")}
    take_turns(Path(sys.argv[1]), 3, int(sys.argv[2]), sides, sys.argv[3] if len(sys.argv) > 3 else None)


if __name__ == "__main__":
    main()
