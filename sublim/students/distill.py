"""``student=distill``: the LoRA student matches the teacher's next-token distributions on its own answers.

Both arms are distilled, the control from the plain base's logits on the control data, so the control is
trained exactly like the treatment (distillation sharpens a student even without a trait).
"""

from __future__ import annotations

from sublim.stage import Job
from sublim.stages.distill import DISTILL
from sublim.stages.teacher_logits import TEACHER_LOGITS
from sublim.store import Artifact
from sublim.students import STUDENTS, Arm


@STUDENTS.register("distill")
def train(job: Job, model: Artifact, arm: Arm, n_train: int) -> dict[str, Artifact]:
    logits = TEACHER_LOGITS(job, {"system_prompt": arm.system_prompt}, label=arm.name, model=arm.teacher,
                            data=arm.data, adapter=arm.teacher_adapter)
    student = DISTILL(job, {"n_train": n_train}, label=arm.name, model=model, data=arm.data, logits=logits)
    return {"train": student, "teacher_logits": logits}
