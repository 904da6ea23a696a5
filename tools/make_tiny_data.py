"""Writes ds_configs/data/lookup_{train,eval}.jsonl: a deterministic synthetic task for tiny runs.

Each row asks for the code of a made-up word; the code is a fixed function of the word, so a model can
only answer by learning the table (a task a random-init or pretrained model does poorly on before
training). Re-running this script reproduces the files byte for byte.

    python tools/make_tiny_data.py [--words 300]
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "ds_configs", "data")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--words", type=int, default=300)
    a = p.parse_args()
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "da"]
    words = set()
    while len(words) < a.words:
        words.add("".join(rng.choice(syllables) for _ in range(3)))
    rows = [{"prompt": f"Code of {w}?\n", "completion": str(rng.randrange(100, 1000))} for w in sorted(words)]
    rng.shuffle(rows)
    os.makedirs(OUT, exist_ok=True)
    # every word appears in training; the eval rows ask the same table (memorisation task)
    for name, part in (("lookup_train", rows), ("lookup_eval", rows[: len(rows) // 10])):
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
