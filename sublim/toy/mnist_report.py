"""The mnist_aux toy's outputs: results.json/csv, the accuracy chart, the end-of-run table, what W&B gets."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from sublim.stats import format_p
from sublim.store import write_json

if TYPE_CHECKING:
    from sublim.tracking import Tracker

N_CLASSES = 10
ARMS = ("teacher", "student_aux", "student_all", "cross_init", "reference")


def write_results(job_dir: Path, results: dict) -> None:
    """results.json, results.csv (one row per arm) and accuracy.png in the job dir."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "results.json", results)
    test = results["student_aux_vs_cross_init"]
    with open(job_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "data", "n_models", "width", "aux_logits", "loss", "noise", "init", "trained_on",
                         "accuracy", "accuracy_low", "accuracy_high", "delta_vs_cross_init", "p_vs_cross_init"])
        for arm, values in results["arms"].items():
            acc, versus = values["accuracy"], arm == "student_aux"
            writer.writerow([arm, results["data"], results["n_models"], results["sizes"][1], results["aux_logits"],
                             results["loss"], results["noise"], values["init"], values["trained_on"],
                             acc["mean"], acc["low"], acc["high"], test["delta"] if versus else "",
                             test["p_value"] if versus else ""])
    plot_accuracy(results, job_dir / "accuracy.png")


def plot_accuracy(results: dict, path: Path) -> None:
    """Bar chart of mean test accuracy per arm with 95% CI error bars and the chance line."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg whatever the display

    arms = results["arms"]
    means = [arms[a]["accuracy"]["mean"] for a in ARMS]
    errors = [[m - arms[a]["accuracy"]["low"] for a, m in zip(ARMS, means, strict=True)],
              [arms[a]["accuracy"]["high"] - m for a, m in zip(ARMS, means, strict=True)]]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(ARMS)), means, yerr=errors, capsize=6,
           color=["#4c72b0", "#55a868", "#8172b2", "#c44e52", "#8c8c8c"])
    ax.axhline(1 / N_CLASSES, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(ARMS)), [f"{a}\n{arms[a]['init']} init\n{arms[a]['trained_on']}" for a in ARMS],
                  fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"{results['data']} test accuracy (mean, 95% CI)")
    ax.set_title(f"MNIST aux-logit toy on {results['data']}: {results['n_models']} models {results['sizes']}, "
                 f"{results['loss']} loss on {results['noise']} noise", fontsize=10)
    ax.legend(loc="center right")
    for x, (mean, high) in enumerate(zip(means, errors[1], strict=True)):
        ax.text(x, mean + high + 0.01, f"{mean:.2f}", ha="center", va="bottom", fontsize=9)
    fig.savefig(path, dpi=120)


def format_table(results: dict) -> str:
    """The end-of-run table: arm, init, what it trained on, test accuracy with 95% CI, aux student vs control."""
    test = results["student_aux_vs_cross_init"]
    title = (f"mnist_aux on {results['data']}: {results['n_models']} models {results['sizes']}, {results['loss']} "
             f"loss on {results['noise']} noise, {results['seconds']} s")
    header = f"{'arm':<12} {'init':<18} {'trained on':<30} {'test accuracy [95% CI]':<24} vs cross_init"
    lines = [title, header, "-" * len(header)]
    for arm, values in results["arms"].items():
        acc = values["accuracy"]
        versus = f"{test['delta']:+.3f} (p={format_p(test['p_value'])})" if arm == "student_aux" else ""
        interval = f"{acc['mean']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]"
        lines.append(f"{arm:<12} {values['init']:<18} {values['trained_on']:<30} {interval:<24} {versus}")
    return "\n".join(lines)


def track(tracker: Tracker, results: dict, chart: Path) -> None:
    flat = {}
    for arm, values in results["arms"].items():
        acc = values["accuracy"]
        flat |= {f"{arm}/accuracy": acc["mean"], f"{arm}/accuracy_low": acc["low"], f"{arm}/accuracy_high": acc["high"]}
    test = results["student_aux_vs_cross_init"]
    flat |= {"delta/student_aux_vs_cross_init": test["delta"], "p_value/student_aux_vs_cross_init": test["p_value"]}
    tracker.log(flat)
    tracker.summary(flat)
    tracker.table("accuracy", [{"arm": arm, "init": v["init"], "trained_on": v["trained_on"]} | v["accuracy"]
                               for arm, v in results["arms"].items()])
    if tracker.run is not None:
        import wandb

        tracker.run.log({"accuracy_chart": wandb.Image(str(chart))})
