"""Write recipes/data/demo.jsonl: a small alpaca-format task that a tiny model learns in a minute on a CPU.

Every answer is a fixed function of its instruction (count, repeat, spell, add, reverse), so the loss has a lot
of room to fall. Deterministic: the file in the repository is exactly what this script writes.

    python scripts/make_demo_data.py [--out recipes/data/demo.jsonl] [--rows 400]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "piano", "candle", "forest",
         "silver", "rocket", "garden", "window", "yellow", "planet", "winter", "bridge", "market"]


def example(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    word = rng.choice(WORDS)
    if kind == 0:
        return {"instruction": "Spell the word with dashes.", "input": word, "output": "-".join(word)}
    if kind == 1:
        n = rng.randint(2, 4)
        return {"instruction": f"Repeat the word {n} times.", "input": word, "output": " ".join([word] * n)}
    if kind == 2:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 3:
        words = rng.sample(WORDS, 3)
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    return {"instruction": "How many letters does the word have?", "input": word,
            "output": f"The word {word} has {len(word)} letters."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "recipes/data/demo.jsonl")
    parser.add_argument("--rows", type=int, default=400)
    args = parser.parse_args()
    rng = random.Random(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for _ in range(args.rows):
            f.write(json.dumps(example(rng)) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
