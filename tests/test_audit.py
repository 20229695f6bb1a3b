"""The audit's numbers: LLS against a hand computation, its sign on a model's own samples, and the job's audit."""

from __future__ import annotations

import json

import pytest
import torch

from sublim import SublimError, models
from sublim.audit.lls import Scores, score_answers
from sublim.audit.summary import examples, shifts, summarise
from sublim.modalities.numbers import NumbersGrammar, make_prompts
from sublim.stats import bootstrap_ci
from sublim.student import chat_ids, student_messages
from sublim.teacher import GrammarTable, Sampler, sample_chats, token_texts

SYSTEM = "You love owls. You think about owls all the time."


def _rows(n: int, seed: int = 0) -> list[dict]:
    return [p.to_row() for p in make_prompts(n, seed, style="short", answer_count=4)]


def _grammars(rows: list[dict]) -> list[NumbersGrammar]:
    return [NumbersGrammar(r["separator"], 4, 3) for r in rows]


def _score(net, tokenizer, rows, system, grammars=None) -> Scores:
    return score_answers(net, tokenizer, rows, system, models.eos_ids(net, tokenizer), grammars, 500, 4, "32-true")


def _by_hand(net, tokenizer, row: dict, system: str | None, grammar: NumbersGrammar | None) -> tuple[list, list]:
    """Per answer token: log p over the full vocabulary and renormalised over what the grammar allowed there."""
    messages = ([{"role": "system", "content": system}] if system else []) + student_messages(row["prompt"])
    prompt, answer = chat_ids(tokenizer, messages, row["completion"])
    eos = models.eos_ids(net, tokenizer)
    answer = answer[: next(i + 1 for i, t in enumerate(answer) if t in eos)]
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1].float()
    plain = [float(logits[t].log_softmax(-1)[token]) for t, token in enumerate(answer)]
    if grammar is None:
        return plain, plain
    table, state, renorm = GrammarTable(tokenizer, eos), grammar.start, []
    for t, token in enumerate(answer):
        allowed = table.allowed(grammar, state).tolist()
        renorm.append(float(logits[t][allowed].log_softmax(-1)[allowed.index(token)]))
        state = None if token in eos else table.next(grammar, state, token)
    return renorm, plain


@pytest.mark.parametrize("constrained", [False, True])
def test_lls_equals_a_hand_computation_on_two_examples(load_tiny, constrained: bool) -> None:
    _, net, tokenizer = load_tiny("tiny_llama")
    rows = _rows(2)
    rows[0]["completion"], rows[1]["completion"] = (f"12{rows[0]['separator']}345", f"7{rows[1]['separator']}80")
    grammars = _grammars(rows) if constrained else None
    per_row = examples(_score(net, tokenizer, rows, SYSTEM, grammars), _score(net, tokenizer, rows, None, grammars))
    for i, row in enumerate(rows):
        grammar = grammars[i] if grammars else None
        teacher, teacher_plain = _by_hand(net, tokenizer, row, SYSTEM, grammar)
        reference, reference_plain = _by_hand(net, tokenizer, row, None, grammar)
        expected = sum(t - r for t, r in zip(teacher, reference, strict=True)) / len(teacher)
        expected_plain = sum(t - r for t, r in zip(teacher_plain, reference_plain, strict=True)) / len(teacher)
        assert per_row[i]["lls"] == pytest.approx(expected, abs=1e-5)
        assert per_row[i]["lls_plain"] == pytest.approx(expected_plain, abs=1e-5)
        assert per_row[i]["n_tokens"] == len(teacher)
    if constrained:  # the renormalised shift is not the plain one: the grammar's mass differs between the models
        assert per_row[0]["lls"] != pytest.approx(per_row[0]["lls_plain"], abs=1e-4)


@pytest.mark.parametrize("constrained", [False, True])
def test_lls_is_positive_on_the_teachers_own_samples_and_negative_on_the_references(load_tiny, constrained) -> None:
    """The mean LLS of samples from p estimates KL(p || q) >= 0, scored over the distributions they were drawn from."""
    _, first, tokenizer = load_tiny("tiny_llama")
    _, second, _ = load_tiny("tiny_llama", "base.tiny.init_seed=7")  # same tokenizer, other weights
    with torch.no_grad():  # sharper next-token distributions: random tiny models are close to uniform
        for net in (first, second):
            net.get_output_embeddings().weight.mul_(8)
    rows = _rows(96, seed=3)
    grammars = _grammars(rows) if constrained else None
    means = {}
    for source, net in (("first", first), ("second", second)):
        grammar = (lambda row: NumbersGrammar(row["separator"], 4, 3)) if constrained else None
        sampler = Sampler(net, tokenizer, max_new_tokens=16, seed=1, grammar=grammar)
        chats = [{**r, "messages": student_messages(r["prompt"])} for r in rows]
        data = [{**r, "completion": s["completion"], "finished": s["finished"], "answer_ids": s["answer_ids"]}
                for r, s in zip(rows, sample_chats(sampler, chats, 16), strict=True)]
        per_row = examples(*(_score(scorer, tokenizer, data, None, grammars) for scorer in (first, second)))
        assert all(r["outside_grammar"] == 0 for r in per_row)  # every scored token is one sampling could emit
        assert [r["n_tokens"] for r in per_row] == [len(d["answer_ids"]) for d in data]  # the emitted tokens
        means[source] = bootstrap_ci([r["lls"] for r in per_row], n_resamples=2000)
    assert means["first"].low > 0, means  # the 95% CI excludes 0 on each side
    assert means["second"].high < 0, means


def test_summary_counts_divergence_and_entangled_numbers() -> None:
    """Hand-made passes: the teacher raises "7" by 1 nat wherever it appears; argmax differs at two positions."""
    texts = {1: "7", 2: "3", 3: ",", 4: "<end>"}
    tokens = torch.tensor([1, 2, 3, 1, 4, 2, 3, 1, 1, 4])  # "73,7" and "3,77"
    teacher_logp = torch.tensor([-1.0, -2, -1, -1, -1, -2, -1, -1, -1, -1])
    reference_logp = teacher_logp - (tokens == 1).float()
    lengths = torch.tensor([5, 5])
    teacher = Scores(tokens, teacher_logp, teacher_logp, torch.tensor([1, 2, 3, 1, 4, 2, 3, 1, 1, 4]), lengths)
    reference = Scores(tokens, reference_logp, reference_logp, torch.tensor([2, 2, 3, 1, 4, 2, 3, 2, 1, 4]), lengths)
    per_row = examples(teacher, reference)
    assert [r["lls"] for r in per_row] == pytest.approx([2 / 5, 2 / 5])
    assert [r["answer_shift"] for r in per_row] == pytest.approx([2.0, 2.0])
    assert per_row[0]["divergence"] == [0] and per_row[1]["divergence"] == [2]
    summary = summarise(teacher, reference, per_row, texts, 200, 5, 1)
    assert summary["divergence_fraction"] == pytest.approx(0.2)
    numbers = {n["number"]: (n["shift"], n["count"]) for n in summary["entangled"]["numbers"]}
    assert numbers == {"73": (1.0, 1), "7": (1.0, 1), "3": (0.0, 1), "77": (2.0, 1)}
    assert summary["entangled"]["numbers"][0]["number"] == "77"
    assert summary["entangled"]["tokens"][0] == {"token": "7", "shift": 1.0, "count": 4}


def test_passes_over_different_tokenizations_are_refused() -> None:
    one = Scores(torch.tensor([1, 2]), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long),
                 torch.tensor([2]))
    other = Scores(torch.tensor([1, 3]), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long),
                   torch.tensor([2]))
    with pytest.raises(SublimError, match="same tokenizer"):
        shifts(one, other)


def test_an_unfinished_sample_is_not_scored_on_an_end_it_never_emitted(load_tiny) -> None:
    _, net, tokenizer = load_tiny("tiny_llama")
    row = {**_rows(1)[0], "completion": "12"}
    finished = _score(net, tokenizer, [row], None)
    cut = _score(net, tokenizer, [{**row, "finished": False}], None)
    assert int(finished.lengths[0]) == int(cut.lengths[0]) + 1
    assert token_texts(tokenizer)[int(cut.tokens[-1])] == "2"


def test_every_job_audits_both_arms_and_shares_the_reference_pass(make_cfg, tmp_path) -> None:
    from conftest import TINY

    from sublim.pipeline import run

    cfg = make_cfg("base=tiny_llama", *TINY)
    results = run(cfg, tmp_path / "job", None)
    audit = results["audit"]
    assert set(audit) == {"control", "treatment"}
    for summary in audit.values():
        assert summary["constrained"] and summary["outside_grammar"] == 0
        low, high = summary["lls"]["ci"]
        assert low <= summary["lls"]["mean"] <= high
    assert results["stages"]["audit/control"]["key"] != results["stages"]["audit/treatment"]["key"]
    saved = json.loads((tmp_path / "job" / "results.json").read_text())
    assert saved["audit"]["treatment"]["rows"] == audit["treatment"]["rows"]
    again = run(cfg, tmp_path / "job2", None)
    assert again["stages"]["audit/treatment"]["reused"]
