"""What every benchmark shares: the same model load as the pipeline, a matmul roofline, medians, a table.

Each benchmark measures sublim and its baseline in the same process, on the same inputs, alternating
repetitions, and reports medians, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(*overrides: str) -> DictConfig:
    """The pipeline's own composed config (store under outputs/ unless paths.root is overridden)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


def load_base(cfg: DictConfig) -> tuple[torch.nn.Module, object]:
    """The base model exactly as the pipeline loads it (converted once into the store)."""
    from sublim import models
    from sublim.stages.model import model_artifact
    from sublim.store import Store

    return models.load(model_artifact(cfg.base, Store(cfg.paths.store)), cfg.base)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Peak fp32 matmul throughput of this machine right now (the roofline the benchmarks quote)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def forward_flops_per_token(net: torch.nn.Module) -> float:
    """2 x parameters per token (embedding lookups excluded, the output head included)."""
    embed = net.get_input_embeddings().weight.numel()
    head = net.get_output_embeddings().weight.numel()
    params = sum(p.numel() for p in net.parameters())
    tied = net.get_input_embeddings().weight is net.get_output_embeddings().weight
    return 2.0 * (params - embed + (head if tied else 0))


def alternate(runs: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run each contender once per round, ``repeats`` rounds; every run returns its metrics (with "seconds")."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for round_ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            metrics = run()
            metrics["seconds"] = time.perf_counter() - start
            results[name].append(metrics)
            print(f"  round {round_ + 1}/{repeats} {name}: {metrics['seconds']:.1f} s", flush=True)
    return results


def median(values: list[dict], key: str) -> float:
    return statistics.median(v[key] for v in values)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
