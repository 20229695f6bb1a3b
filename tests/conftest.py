"""Compose-based fixtures: tests build configs exactly as `python -m sublim.train` does."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# A whole job on a tiny random base in a few seconds.
TINY = [
    "logger=none",
    "data.n_prompts=24",
    "data.n_train=16",
    "sampling.batch_size=8",
    "sampling.max_new_tokens=12",
    "student.epochs=1",
    "student.batch_size=8",
    "eval.n_questions=6",
    "eval.samples_per_question=2",
    "eval.batch_size=16",
    "eval.n_permutations=200",
]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose with outputs under this test's tmp dir."""

    def make(*overrides: str, root: Path | None = None) -> DictConfig:
        return compose_config([f"paths.root={root or tmp_path}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store shared by tests that only need tiny model artifacts."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def load_tiny(tiny_store: Path) -> Callable:
    """(cfg, model, tokenizer) of a tiny base, freshly loaded on each call (tests may train it)."""
    from sublim import models
    from sublim.store import Store

    def load(name: str = "tiny_llama", *overrides: str):
        cfg = compose_config([f"base={name}", f"paths.root={tiny_store}", *overrides])
        artifact = models.model_artifact(cfg.base, Store(tiny_store))
        net, tokenizer = models.load(artifact, cfg.base)
        return cfg, net, tokenizer

    return load
