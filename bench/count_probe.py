"""Can the count_colour answer be read from which visual tokens show the asked colour? From the
scene geometry alone (no model): for N procedural count_colour scenes, the joint distribution of
(merged visual tokens, 28 px at the tiny model's 112-px images, that the asked colour's objects'
bounding boxes overlap; true count), and the Bayes-optimal accuracy of reading the count from that
token count, beside the best constant answer. docs/results/demo.md cites it.

    .venv/bin/python bench/count_probe.py [--n 20000]
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDE, TOKEN = 112, 28  # the demo's image size; patch 14 x spatial merge 2


def covered_tokens(scene: dict, colour: str) -> int:
    cells = set()
    for o in scene["objects"]:
        if o["colour"] != colour:
            continue
        r = o["radius"]
        cells |= {(tx, ty) for tx in range(SIDE // TOKEN) for ty in range(SIDE // TOKEN)
                  if o["x"] + r > tx * TOKEN and o["x"] - r < (tx + 1) * TOKEN
                  and o["y"] + r > ty * TOKEN and o["y"] - r < (ty + 1) * TOKEN}
    return len(cells)


def main(argv=None) -> int:
    from avar_ray.data.scenes import count_colour

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000)
    n = p.parse_args(argv).n
    by_tokens: dict[int, Counter] = defaultdict(Counter)
    prior: Counter = Counter()
    for i in range(n):
        draw = count_colour(random.Random(f"count-probe-{i}"), SIDE)
        by_tokens[covered_tokens(draw.scene, draw.target["colour"])][int(draw.answer)] += 1
        prior[int(draw.answer)] += 1
    print("answer prior:", {k: round(v / n, 3) for k, v in sorted(prior.items())})
    print(f"best constant answer: {max(prior.values()) / n:.3f}; Bayes-optimal from the covered-token count: "
          f"{sum(max(c.values()) for c in by_tokens.values()) / n:.3f}")
    for tokens in sorted(by_tokens):
        print(f"  {tokens:2d} tokens: counts {dict(sorted(by_tokens[tokens].items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
