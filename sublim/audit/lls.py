"""Per-token log-probs of a dataset's answers under one model: the two passes the audit compares.

An answer is scored as the tokens a model emits after its generation prompt, up to and including the end of
turn (the template's trailing newline is not emitted and not scored). Where the data was sampled under a
grammar (constrained numbers), every position's distribution is renormalised over the tokens the grammar
allowed there: those are the distributions the samples were drawn from, so the mean shift on a teacher's own
samples estimates KL(teacher || reference) >= 0. The plain full-vocabulary figure is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sublim.forcing import AnswerForward, forced
from sublim.modalities.numbers import NumbersGrammar
from sublim.student import chat_ids, student_messages
from sublim.teacher import GrammarTable


@dataclass
class Scores:
    """Flat over every answer position of every row (rows in order); ``lengths`` splits them per row."""

    tokens: torch.Tensor      # [positions] the answer token scored
    logp: torch.Tensor        # [positions] log p(token), renormalised over the grammar's tokens; NaN: outside it
    logp_plain: torch.Tensor  # [positions] log p(token) under the full softmax
    argmax: torch.Tensor      # [positions] the model's most likely token (within the grammar's tokens, if any)
    lengths: torch.Tensor     # [rows]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": getattr(self, name) for name in ("tokens", "logp", "logp_plain", "argmax",
                                                                     "lengths")}


def answer_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict], system: str | None, eos: list[int],
                max_length: int) -> list[dict]:
    """Prompt + answer ids per row, the answer cut after its first end-of-turn token (what sampling emits).

    Samples carry the ids the teacher emitted (``answer_ids``): those are scored, since the text re-tokenised
    may be other tokens (BPE merges, dropped specials) that the teacher never drew. Rows without them (a
    dataset sublim did not make, or an answer the modality's parser cut, which keeps its ``raw`` text) are
    tokenised as the student reads them. A sample cut by ``max_new_tokens`` (``finished: false``) never
    emitted its end: the template's is not scored.
    """
    out, ends = [], set(eos)
    for row in rows:
        messages = ([{"role": "system", "content": system}] if system else []) + student_messages(row["prompt"])
        prompt, answer = chat_ids(tokenizer, messages, row["completion"])
        if "answer_ids" in row and "raw" not in row:
            answer = list(row["answer_ids"])
        end = next((i + (row.get("finished") is not False) for i, token in enumerate(answer) if token in ends),
                   len(answer))
        ids = (prompt + answer[:end])[:max_length]
        out.append({"ids": ids, "answer": ids[len(prompt):], "n_answer": len(ids) - len(prompt)})
    return out


def grammar_ids(table: GrammarTable, grammar: NumbersGrammar, answer: list[int]) -> torch.Tensor:
    """[answer positions, k]: the tokens the grammar allowed at each position, ascending, padded with -1 (all -1
    once the answer has left the grammar); one tensor per row, so scoring gathers them without a loop."""
    eos = set(table.eos.tolist())
    state, sets = grammar.start, []
    for token in answer:
        sets.append(torch.zeros(0, dtype=torch.long) if state is None else table.allowed(grammar, state))
        state = None if state is None or token in eos else table.next(grammar, state, token)
    if not sets:  # no answer tokens: one (empty) column, as reductions over the last dim need
        return torch.zeros((0, 1), dtype=torch.long)
    # ascending ids: a tie for the argmax goes to the lowest id, as over the full vocabulary
    last = torch.iinfo(torch.long).max
    ids = torch.nn.utils.rnn.pad_sequence(sets, batch_first=True, padding_value=last).sort(-1).values
    return ids.masked_fill(ids == last, -1)


class AnswerScores(AnswerForward):
    """Per answer position: log p(token) (plain and grammar-renormalised) and the argmax.

    log p(token) is its logit minus a logsumexp: over the vocabulary (plain), over the allowed ids only
    (renormalised, gathered), without materialising a [positions, vocab] log-softmax.
    """

    def reduce(self, logits: torch.Tensor, row: dict) -> tuple[torch.Tensor, ...]:
        tokens = torch.tensor(row["answer"], dtype=torch.long, device=logits.device)
        picked = logits.gather(1, tokens[:, None])[:, 0]
        plain, argmax = picked - logits.logsumexp(-1), logits.argmax(-1)
        if row["allowed"] is None:
            return tokens.cpu(), plain.cpu(), plain.cpu(), argmax.cpu()
        allowed = row["allowed"].to(logits.device)
        valid = allowed >= 0
        restricted = logits.gather(1, allowed.clamp(min=0)).masked_fill(~valid, float("-inf"))
        # a position outside the grammar (or a token it did not allow) has no renormalised probability
        inside = (allowed == tokens[:, None]).any(-1)
        renormalised = torch.where(inside, picked - restricted.logsumexp(-1), float("nan"))
        best = allowed.gather(1, restricted.argmax(-1, keepdim=True))[:, 0]
        argmax = torch.where(valid.any(-1), best, argmax)
        return tokens.cpu(), renormalised.cpu(), plain.cpu(), argmax.cpu()


def score_answers(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], system: str | None,
                  eos: list[int], grammars: list[NumbersGrammar] | None, max_length: int, batch_size: int,
                  precision: str) -> Scores:
    """One teacher-forced pass over every row: the model reads ``system`` (None: its default) + prompt + answer."""
    items = answer_rows(tokenizer, rows, system, eos, max_length)
    table = GrammarTable(tokenizer, eos) if grammars else None
    for i, item in enumerate(items):
        item["allowed"] = grammar_ids(table, grammars[i], item["answer"]) if table else None
    done = forced(AnswerScores(net, tokenizer.pad_token_id), items, batch_size, precision)
    tokens, logp, plain, argmax = (torch.cat([d[k] for d in done]) if done else torch.zeros(0) for k in range(4))
    return Scores(tokens.long(), logp.float(), plain.float(), argmax.long(),
                  torch.tensor([item["n_answer"] for item in items], dtype=torch.long))
