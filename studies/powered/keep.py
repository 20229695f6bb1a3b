"""Copy one sitting's finished jobs (small files only) into the study's committed runs folder.

    python studies/powered/keep.py outputs/multiruns/powered/seed0

Each job lands in ``studies/powered/runs/<experiment>/seed<k>/<job>/`` with its results.json, results.csv,
provenance.json, Hydra config and overrides and its small plots, so the study's report and decision pool
sittings whose stores are gone. A job without provenance.json is refused: write it first, from the store that
computed the job, with ``python -m sublim.store provenance <sweep dir>``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

RUNS = Path(__file__).resolve().parent / "runs"
FILES = ("results.json", "results.csv", "pooled.csv", "provenance.json", "train.log", ".hydra/config.yaml",
         ".hydra/overrides.yaml")
MAX_PLOT_BYTES = 500_000


def destination(job: Path) -> Path:
    overrides = dict(str(o).lstrip("+").partition("=")[::2] for o in yaml.safe_load(
        (job / ".hydra" / "overrides.yaml").read_text()))
    results = json.loads((job / "results.json").read_text())
    seed = "-".join(str(s["seed"]) for s in results["seeds"]) if results.get("seeds") else results["seed"]
    return RUNS / overrides.get("experiment", "default") / f"seed{seed}" / job.name


def keep(sweep: Path) -> list[Path]:
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    if not jobs:
        raise SystemExit(f"no finished job (results.json) under {sweep}")
    lacking = [str(job) for job in jobs if not (job / "provenance.json").exists()]
    if lacking:
        raise SystemExit(f"no provenance.json in {', '.join(lacking)}: run python -m sublim.store provenance {sweep}")
    kept = []
    for job in jobs:
        out = destination(job)
        for name in [*FILES, *(p.name for p in job.glob("*.png") if p.stat().st_size <= MAX_PLOT_BYTES)]:
            if (job / name).exists():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(job / name, out / name)
        kept.append(out)
        print(f"kept {job} -> {out}")
    return kept


if __name__ == "__main__":
    keep(Path(sys.argv[1]))
