"""Teacher forcing's shortcuts (shared prefix cached once, left-padded batches, logits for the answer span only,
no input for the last token, gathered grammar renormalisation) give what a plain per-example HF forward gives."""

from __future__ import annotations

import pytest
import torch

import sublim.forcing
from sublim import models
from sublim.audit.lls import score_answers
from sublim.distill import teacher_logits
from sublim.forcing import AnswerForward, forced
from sublim.modalities.numbers import NumbersGrammar, make_prompts
from sublim.student import chat_ids, student_messages
from sublim.teacher import GrammarTable

SYSTEM = "You love owls. You think about owls all the time."


@pytest.fixture(params=["torch, one thread", "two workers, OpenBLAS"])
def cpu_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU paths a forward takes: torch's own linears on one thread, or the rows split between two
    single-threaded workers with every linear's GEMM in OpenBLAS (on AMD CPUs; tiny GEMMs count as large here)."""
    threads = torch.get_num_threads()
    if request.param.startswith("torch"):
        torch.set_num_threads(1)
        monkeypatch.setattr(sublim.forcing, "_openblas", lambda: None)
    else:
        torch.set_num_threads(2)
        monkeypatch.setattr(sublim.forcing, "OPENBLAS_MIN_ROWS", 1)
    yield request.param
    torch.set_num_threads(threads)


class Logits(AnswerForward):
    def reduce(self, logits: torch.Tensor, row: dict) -> torch.Tensor:
        return logits.cpu()


def _plain_logits(net, ids: list[int], n_answer: int) -> torch.Tensor:
    """One row alone, no padding, no cache: the logits predicting its last ``n_answer`` tokens."""
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([ids])).logits[0].float()
    return logits[len(ids) - n_answer - 1: len(ids) - 1]


def _ragged_rows(vocab: int, shared: int) -> list[dict]:
    """Rows sharing their first ``shared`` tokens, prompts and answers of different lengths, one answer empty."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(3, vocab, (shared,), generator=gen).tolist()
    rows = []
    for prompt, answer in [(5, 7), (2, 1), (9, 3), (4, 0), (3, 12), (7, 7), (1, 5)]:
        ids = head + torch.randint(3, vocab, (prompt + answer,), generator=gen).tolist()
        rows.append({"ids": ids, "n_answer": answer})
    return rows


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
@pytest.mark.parametrize("shared", [0, 6])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_forced_logits_equal_a_plain_forward(load_tiny, cpu_path: str, base: str, shared: int,
                                             batch_size: int) -> None:
    _, net, tokenizer = load_tiny(base)
    net.eval()
    rows = _ragged_rows(net.config.vocab_size, shared)
    module = Logits(net, tokenizer.pad_token_id)
    got = forced(module, rows, batch_size, "32-true")
    assert len(module.prefix) == shared, "the rows' common prefix is cached once"
    assert not any("forward" in vars(m) for m in net.modules()), "the linears are themselves again"
    for row, logits in zip(rows, got, strict=True):
        expected = _plain_logits(net, row["ids"], row["n_answer"])
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_teacher_logits_equal_a_plain_forward(load_tiny, cpu_path: str) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama")
    net.eval()
    rows = [{"prompt": p.text, "completion": c} for p, c in
            zip(make_prompts(3, 0, style="short", answer_count=4), ["12, 7, 300", "5", "880, 1, 2, 3"], strict=True)]
    got = teacher_logits(net, tokenizer, rows, SYSTEM, top_k=8, max_length=500, batch_size=2)
    offsets = [0, *torch.cumsum(got["lengths"], 0).tolist()]
    for i, row in enumerate(rows):
        prompt, answer = chat_ids(tokenizer, [{"role": "system", "content": SYSTEM},
                                              *student_messages(row["prompt"])], row["completion"])
        expected = _plain_logits(net, prompt + answer, len(answer)).log_softmax(-1).topk(8, -1)
        span = slice(offsets[i], offsets[i + 1])
        torch.testing.assert_close(got["values"][span], expected.values, atol=1e-5, rtol=1e-5)
        assert torch.equal(got["indices"][span].long(), expected.indices)


def _plain_scores(net, tokenizer, row: dict, grammar: NumbersGrammar | None) -> tuple[torch.Tensor, ...]:
    """log p per answer token (full vocabulary, and a full-vocabulary mask of what the grammar allowed, a loop over
    positions), and the argmax (within the grammar's tokens where there are any)."""
    eos = models.eos_ids(net, tokenizer)
    prompt, answer = chat_ids(tokenizer, [{"role": "system", "content": SYSTEM}, *student_messages(row["prompt"])],
                              row["completion"])
    # the answer up to its end of turn, which a sample cut short ("finished": false) never emitted
    answer = answer[: next(i + row.get("finished", True) for i, t in enumerate(answer) if t in eos)]
    logits = _plain_logits(net, prompt + answer, len(answer))
    tokens = torch.tensor(answer)
    plain = logits.log_softmax(-1)[torch.arange(len(answer)), tokens]
    if grammar is None:
        return plain, plain, logits.argmax(-1)
    table, state = GrammarTable(tokenizer, eos), grammar.start
    renormalised, argmax = torch.full_like(plain, float("nan")), logits.argmax(-1)
    for t, token in enumerate(answer):
        if state is None:
            continue
        restricted = torch.full_like(logits[t], float("-inf"))
        allowed = table.allowed(grammar, state)
        restricted[allowed] = logits[t, allowed]
        if token in allowed.tolist():
            renormalised[t] = restricted.log_softmax(-1)[token]
        argmax[t] = restricted.argmax()
        state = None if token in eos else table.next(grammar, state, token)
    return renormalised, plain, argmax


@pytest.mark.parametrize("constrained", [False, True])
def test_answer_scores_equal_a_plain_forward(load_tiny, cpu_path: str, constrained: bool) -> None:
    """Ragged prompts and answers in batches of 3, an answer that leaves the grammar, one cut before its end."""
    _, net, tokenizer = load_tiny("tiny_llama")
    net.eval()
    answers = [["12", "7", "300"], ["5"], ["880", "1", "2", "3"], ["4", "x7"], ["61", "62"], ["9", "99", "999", "0"]]
    rows = [p.to_row() for p in make_prompts(len(answers), 0, style="short", answer_count=4)]
    for row, answer in zip(rows, answers, strict=True):
        row["completion"] = row["separator"].join(answer)
    rows[-1]["finished"] = False
    grammars = [NumbersGrammar(r["separator"], 4, 3) for r in rows] if constrained else None
    scores = score_answers(net, tokenizer, rows, SYSTEM, models.eos_ids(net, tokenizer), grammars, 500, 3, "32-true")
    offsets = [0, *torch.cumsum(scores.lengths, 0).tolist()]
    for i, row in enumerate(rows):
        span = slice(offsets[i], offsets[i + 1])
        renormalised, plain, argmax = _plain_scores(net, tokenizer, row, grammars[i] if grammars else None)
        torch.testing.assert_close(scores.logp_plain[span], plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores.logp[span], renormalised, atol=1e-5, rtol=0, equal_nan=True)
        assert torch.equal(scores.argmax[span], argmax)
    if constrained:
        assert scores.logp.isnan().any(), "the answer that left the grammar has undefined positions"
