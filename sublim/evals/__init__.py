"""Eval kinds (``eval.kind``): how base, control and treatment students are measured for the trait.

A kind is a module here registering an ``EvalKind``: the stages that score one model, the per-arm summary,
the treatment-vs-control test, and the rows of the job's table and CSV. See docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from sublim.registry import Registry
from sublim.stage import Job
from sublim.store import Artifact

ARMS = ("control", "treatment")
EVAL_ARMS = ("base", "control", "treatment")


class EvalKind(ABC):
    """One eval kind. ``stages`` returns {slot: {arm: artifact}}; slot ``scores`` holds each arm's
    scores.json and answers.jsonl (with the ``hit`` column), the others are reported in results.stages."""

    scores_stage: str  # the stage of the "scores" slot (its answers.jsonl feeds the W&B answers table)
    metrics: tuple[str, ...]  # per-arm means tracked in W&B and compared treatment vs control
    hit: str  # the answers' column that marks a trait hit

    @abstractmethod
    def stages(self, job: Job, model: Artifact, students: dict[str, Artifact | None]) -> dict[str, dict]: ...

    @abstractmethod
    def summarise_arm(self, job: Job, outputs: dict[str, dict], arm: str) -> dict: ...

    @abstractmethod
    def compare(self, job: Job, scores: dict[str, dict]) -> dict: ...

    @abstractmethod
    def effects(self, results: dict) -> dict[str, float]:
        """One seed's treatment-vs-control effect per metric (the value replicated across seeds)."""

    @abstractmethod
    def format_table(self, results: dict) -> str: ...

    @abstractmethod
    def csv(self, results: dict) -> tuple[list[str], list[list]]: ...


EVALS: Registry[EvalKind] = Registry("eval.kind", "sublim.evals")
