"""Writes ds_configs/data/dates_{train,eval}.jsonl: the demo task, generated deterministically.

Chat rows asking to rewrite an ISO date (2024-03-05) as DD/MM/YYYY (05/03/2024). A small instruct
model answers at length or in the wrong format before fine-tuning, and exactly after: the run's own
exact-match eval measures it. Re-running this script reproduces the files byte for byte.

    python tools/make_demo_data.py [--train 2000] [--eval 100]
"""

import argparse
import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_configs", "data")


def row(rng):
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    question = f"Rewrite the date {y:04d}-{m:02d}-{d:02d} as DD/MM/YYYY. Answer with the date only."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{d:02d}/{m:02d}/{y:04d}"}]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=100)
    a = p.parse_args()
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < a.train + a.eval:
        r = row(rng)
        key = r["messages"][0]["content"]
        if key not in seen:  # eval dates never appear in training
            seen.add(key)
            rows.append(r)
    os.makedirs(OUT, exist_ok=True)
    for name, part in (("dates_train", rows[: a.train]), ("dates_eval", rows[a.train :])):
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
    main()
