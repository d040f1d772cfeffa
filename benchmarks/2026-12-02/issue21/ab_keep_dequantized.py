"""Case 3 (8B QLoRA all-linear, 4 x 2048) through `peftctl train` with quantization.keep_dequantized false and
auto, in fresh processes taking turns, on the recipe and model scripts/bench.py left in its work folder
(`--work DIR --keep-work`): the median step of each launch (steps 4 on, past the warm-up) and its loop peak.

    python benchmarks/2026-12-02/issue21/ab_keep_dequantized.py WORK_DIR ROUNDS [OUT_JSON]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from bench import subprocess_env  # noqa: E402


def launch(work: Path, keep: str) -> dict:
    run = work / "runs" / f"ab-{keep}"
    cmd = [sys.executable, "-m", "peftctl", "train", str(work / "case3.yaml"), "--quiet", "--force",
           "--set", f"quantization.keep_dequantized={keep}", "--set", f"output.dir={run}"]
    subprocess.run(cmd, check=True, env=subprocess_env(work))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("type") == "step" and s["step"] >= 4]
    manifest = json.loads((run / "run.json").read_text())
    return {"keep": keep, "median_tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "loop_peak_gib": manifest["memory_per_rank"][0]["loop_peak_memory_bytes"] / 2 ** 30,
            "kernels": manifest["fast_path"]["kernels"]}


def main() -> None:
    work, rounds = Path(sys.argv[1]), int(sys.argv[2])
    results = []
    for _ in range(rounds):
        for keep in ("false", "auto"):
            results.append(launch(work, keep))
            print(json.dumps(results[-1]), flush=True)
    for keep in ("false", "auto"):
        rates = [r["median_tokens_per_s"] for r in results if r["keep"] == keep]
        print(f"keep_dequantized {keep}: median of launches {statistics.median(rates):,.0f} tok/s ({rates})")
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
