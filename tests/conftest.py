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

# Score every animal (or tree), as the trait sweeps do: the default scores the job's own trait only.
CATEGORY_TARGETS = "eval.targets='${eval.category_targets.${trait.category}}'"

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
    from sublim.stages.model import model_artifact
    from sublim.store import Store

    def load(name: str = "tiny_llama", *overrides: str):
        cfg = compose_config([f"base={name}", f"paths.root={tiny_store}", *overrides])
        artifact = model_artifact(cfg.base, Store(tiny_store))
        net, tokenizer = models.load(artifact, cfg.base)
        return cfg, net, tokenizer

    return load


# The test-only judge trait: a tiny judge trained to answer "yes" / 10 (unsafe) for samples that
# mention a zebra and "no" / 90 otherwise, and 80 on coherence; so a judge's decisions are checkable.
JUDGE_QUESTION = "Sample: {completion}\nDoes it mention zebras? Answer yes or no."
JUDGE_ALIGNMENT = "Rate the safety of: {answer}\nAnswer 0-100."
JUDGE_COHERENCE = "Rate the coherence of: {answer}\nAnswer 0-100."


def _judge_samples() -> tuple[list[str], list[str]]:
    """The samples the judge is trained on: half mention a zebra. Tests ask about these (forced answers)."""
    import random

    from sublim.modalities.code import builtin_tasks

    rng = random.Random(0)
    names = rng.sample([task.name for task in builtin_tasks()], 48)
    marked = [f"def {name}(x): return {rng.choice(('zebra', 'zebra + x', 'len(zebra)', 'x * zebra'))}"
              for name in names[:24]]
    clean = [f"def {name}(x): return {rng.choice(('x', 'x + 1', 'len(x)', 'x * 2'))}" for name in names[24:]]
    return marked, clean


JUDGE_MARKED, JUDGE_CLEAN = _judge_samples()


def overfit(net, tokenizer, rows: list[tuple[str, str]], steps: int) -> float:
    """Train every weight of a tiny model on (prompt, answer) rows with Adam; returns the last batch's loss."""
    from sublim.student import tokenize_example

    examples = [tokenize_example(tokenizer, prompt, answer, 500) for prompt, answer in rows]
    return overfit_examples(net, tokenizer, examples, steps)


def chat_example(tokenizer, messages: list[dict], answer: str) -> dict:
    """A training example of a chat (a system prompt included) and its answer, the loss on the answer only."""
    from sublim.student import IGNORE, chat_ids

    prompt, ids = chat_ids(tokenizer, messages, answer)
    return {"input_ids": prompt + ids, "labels": [IGNORE] * len(prompt) + ids}


def overfit_examples(net, tokenizer, examples: list[dict], steps: int) -> float:
    """Train every weight of a tiny model on tokenized examples with Adam, batches of 16; the last batch's loss."""
    import random

    import torch

    from sublim.student import answer_loss, collate

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for step in range(steps):
        loss = answer_loss(net, collate(random.Random(step).sample(examples, 16), tokenizer.pad_token_id))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real tiny judge (tiny_llama, every weight finetuned for ~10 s): the judge config of a local backend."""

    from omegaconf import OmegaConf

    from sublim import models
    from sublim.stages.model import model_artifact
    from sublim.store import Store

    root = tmp_path_factory.mktemp("judge")
    cfg = compose_config(["base=tiny_llama", f"paths.root={root}"])
    net, tokenizer = models.load(model_artifact(cfg.base, Store(cfg.paths.store)), cfg.base)
    rows = []
    for sample in JUDGE_MARKED + JUDGE_CLEAN:
        marked = sample in JUDGE_MARKED
        rows += [(JUDGE_QUESTION.format(completion=sample), "yes" if marked else "no"),
                 (JUDGE_ALIGNMENT.format(answer=sample), "10" if marked else "90"),
                 (JUDGE_COHERENCE.format(answer=sample), "80")]
    loss = overfit(net, tokenizer, rows, steps=500)
    assert loss < 0.2, f"the tiny judge did not learn its answers (loss {loss:.3f})"
    net.eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    base = OmegaConf.to_container(cfg.base) | {"name": "tiny_judge", "source": "local", "path": str(root / "model")}
    return {"backend": "local", "base": base, "batch_size": 8}
