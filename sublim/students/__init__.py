"""Student kinds (``student.kind``): how an arm's student is trained from its teacher's filtered data.

A kind is a module here that registers a function ``train(job, model, arm, n_train) -> {slot: artifact}``;
the slot ``train`` holds the student's adapter, other slots (e.g. ``teacher_logits``) are reported too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sublim.registry import Registry
from sublim.stage import Job
from sublim.store import Artifact


@dataclass(frozen=True)
class Arm:
    """One arm's teacher and data: treatment (the trait) or control (the same base, no trait)."""

    name: str
    teacher: Artifact
    teacher_adapter: Artifact | None
    system_prompt: str | None
    data: Artifact


Train = Callable[[Job, Artifact, Arm, int], dict[str, Artifact]]
STUDENTS: Registry[Train] = Registry("student.kind", "sublim.students")
