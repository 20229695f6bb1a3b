"""The powered study's number of seeds, from its pilot, by the rule fixed in docs/studies.md.

    python studies/powered/size.py outputs/multiruns/powered_pilot/0      # the pilot job's dir

s is the across-seed standard deviation of the pilot's per-seed effects log(P_T(owl) / P_C(owl)); k is the
smallest of 3..6 seeds whose minimum detectable effect (one-sided t at 0.05, 80% power) is <= log 1.5.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from sublim.replication import minimum_detectable_effect, seeds_needed

TARGET = math.log(1.5)
CHOICES = range(3, 7)


def main(job: Path) -> None:
    test = json.loads((job / "results.json").read_text())["pooled"]["log_probability_ratio"]
    sd = test["sd"]
    effects = ", ".join(f"{e:+.4f}" for e in test["effects"])
    print(f"pilot: {test['n_seeds']} seeds, per-seed log(P_T / P_C) {effects}; s = {sd:.4f} "
          f"({test['n_seeds'] - 1} degree(s) of freedom)")
    for k in CHOICES:
        mde = minimum_detectable_effect(sd, k)
        print(f"  k = {k}: MDE {mde:.3f} (x{math.exp(mde):.2f}){'  <= log 1.5' if mde <= TARGET else ''}")
    print(f"seeds for the study: {seeds_needed(sd, TARGET, CHOICES)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
