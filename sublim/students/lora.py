"""``student=lora``: supervised finetuning of a LoRA student on the teacher's sampled answers."""

from __future__ import annotations

from sublim.stage import Job
from sublim.stages.train import TRAIN
from sublim.store import Artifact
from sublim.students import STUDENTS, Arm


@STUDENTS.register("lora")
def train(job: Job, model: Artifact, arm: Arm, n_train: int) -> dict[str, Artifact]:
    return {"train": TRAIN(job, {"n_train": n_train}, label=arm.name, model=model, data=arm.data)}
