"""One bench case through `peftctl train` from two checkouts of peftctl, in fresh processes taking turns, on the
recipe and model scripts/bench.py left in its work folder (`--work DIR --keep-work`): the median step of each
launch (steps 4 on, past the warm-up), its loop peak and its fast path. For a regression between two commits on a
host-bound case, where machines differ by more than the change: both sides run on the same machine, alternating.

The other checkout is a folder holding an older `peftctl/` package, made here (`ab-old/` is ignored by git) and
sent to the device with the run's `carry: [".gpu-site", "ab-old"]`, e.g. for run Z's code:

    mkdir -p ab-old && git archive 95d2c88 peftctl | tar -x -C ab-old
    # on the device:
    python scripts/bench.py --cases 4 --sides peftctl --skip-gates --work /tmp/w --keep-work
    python benchmarks/2026-12-02/issue21/ab_checkouts.py /tmp/w 4 ab-old 2 $OUT/ab.json

Arguments: WORK_DIR CASE OLD_CHECKOUT ROUNDS [OUT_JSON]. The head's side is this repository's own `peftctl/`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))
from bench import subprocess_env  # noqa: E402


def launch(work: Path, case: int, side: str, *, root: Path | None = None, sets: tuple[str, ...] = ()) -> dict:
    """One `peftctl train` of the case's recipe, from the peftctl under `root` (None: this repository's), with
    `--set` overrides: the median step past the warm-up, the loop peak, the fast path and which peftctl ran."""
    run = work / "runs" / f"ab-{side}"
    env = subprocess_env(work)
    if root is not None:  # the checkout first: its `peftctl` is the one imported (the site packages stay after it)
        env["PYTHONPATH"] = os.pathsep.join([str(root.resolve())] + env["PYTHONPATH"].split(os.pathsep))
    cmd = [sys.executable, "-m", "peftctl", "train", str(work / f"case{case}.yaml"), "--quiet", "--force",
           "--set", f"output.dir={run}", *(arg for item in sets for arg in ("--set", item))]
    subprocess.run(cmd, check=True, env=env, cwd=work)
    where = subprocess.run([sys.executable, "-c", "import peftctl; print(peftctl.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("type") == "step"]
    steps = [s for s in steps if s["step"] >= min(4, len(steps))]  # past the warm-up (a short smoke run: its last)
    manifest = json.loads((run / "run.json").read_text())
    return {"side": side, "peftctl": where, "median_tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "loop_peak_gib": (manifest["memory_per_rank"][0]["loop_peak_memory_bytes"] or 0) / 2 ** 30,  # 0: CPU
            "fast_path": manifest["fast_path"]}


def take_turns(work: Path, case: int, rounds: int, sides: dict[str, dict], out: str | None = None) -> list[dict]:
    """`rounds` rounds of one launch a side (side name -> `launch`'s keyword arguments), printed as they come, then
    each side's median of launches; the launches written to `out` as JSON."""
    results = []
    for _ in range(rounds):
        for side, how in sides.items():
            results.append(launch(work, case, side, **how))
            print(json.dumps(results[-1]), flush=True)
    for side in sides:
        rates = [r["median_tokens_per_s"] for r in results if r["side"] == side]
        print(f"{side}: median of launches {statistics.median(rates):,.0f} tok/s ({[round(r) for r in rates]})")
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    work, case, old, rounds = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    if not (old / "peftctl" / "__init__.py").is_file():
        sys.exit(f"{old} holds no peftctl package: make it with git archive (see this script's docstring)")
    take_turns(work, case, rounds, {"head": {}, "old": {"root": old}}, sys.argv[5] if len(sys.argv) > 5 else None)


if __name__ == "__main__":
    main()
