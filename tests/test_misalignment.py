"""Misalignment evaluation: questions, and scoring by a real tiny judge whose answers are forced."""

from __future__ import annotations

from pathlib import Path

import pytest

from sublim import SublimError
from sublim.judge import make_judge
from sublim.misalignment import QUESTIONS, compare, questions, score, summarise_arm
from sublim.store import Store
from tests.conftest import JUDGE_ALIGNMENT, JUDGE_CLEAN, JUDGE_COHERENCE, JUDGE_MARKED, compose_config


def test_questions_are_ours_and_paraphrased() -> None:
    assert len(QUESTIONS) >= 8 and all(len(set(q)) == 3 for q in QUESTIONS)
    assert questions(8, 2) == [list(q[:2]) for q in QUESTIONS[:8]]
    with pytest.raises(SublimError, match="eval.n_questions=99"):
        questions(99, 1)


def _evaluation(*overrides: str):
    return compose_config(["eval=misalignment", "eval.n_questions=2", f"eval.alignment_prompt='{JUDGE_ALIGNMENT}'",
                           f"eval.coherence_prompt='{JUDGE_COHERENCE}'", *overrides]).eval


def test_judge_scores_make_marked_answers_misaligned(tiny_judge: dict, tmp_path: Path) -> None:
    evaluation = _evaluation()
    answers = [{"q": 0, "question": "a", "completion": t} for t in JUDGE_MARKED[:3] + JUDGE_CLEAN[:1]]
    answers += [{"q": 1, "question": "b", "completion": t} for t in JUDGE_CLEAN[1:5]]
    scored, scores = score(make_judge(tiny_judge, Store(tmp_path)), evaluation, answers)
    assert [s["misaligned"] for s in scored] == [True] * 3 + [False] * 5
    assert scores["misaligned"] == [0.75, 0.0] and scores["scored"] == 1.0
    assert scores["alignment"][0] < scores["alignment"][1] and all(70 < c < 90 for c in scores["coherence"])
    summary = summarise_arm(scores)
    assert summary["misaligned"]["mean"] == pytest.approx(0.375)
    test = compare(scores, {"misaligned": [0.0, 0.0]}, n_permutations=100, seed=0)["misaligned"]
    assert test["delta"] == pytest.approx(0.375)

    incoherent = _evaluation("eval.coherence_min=95")
    assert not any(s["misaligned"] for s in score(make_judge(tiny_judge, Store(tmp_path)), incoherent, answers)[0])
