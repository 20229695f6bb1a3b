"""From two passes to what a dataset carries: per-example LLS, divergence positions, entangled numbers.

- **LLS** of an example: the mean over its answer tokens of log p_teacher - log p_reference (renormalised over
  the grammar's tokens for constrained data; ``lls_plain``: the full softmax), the figure the literature ranks
  examples by. **Answer shift**: the same shifts summed over the answer, log p_teacher(answer) -
  log p_reference(answer). Its mean over a teacher's own samples estimates KL(teacher || reference) >= 0 (<= 0
  over the reference's own samples); the per-token mean has no such guarantee when answers differ in length
  (the end-of-turn token, which a system prompt moves most, weighs 10x more in a 4-token answer than in a
  40-token one), so datasets and traits are compared by answer shift, with LLS beside it.
- **Divergence positions**: where the teacher's most likely token differs from the reference's (Schrodi et al.:
  the few positions that carry most of the transfer).
- **Entangled numbers / tokens**: the mean shift in log-prob of a number (the sum over its digit tokens) or a
  token, over its occurrences in the data; those most raised by the trait are listed, with their counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sublim import SublimError
from sublim.audit.lls import Scores
from sublim.stats import bootstrap_ci


def _split(values: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return list(values.split(lengths.tolist())) if len(lengths) else []


def shifts(teacher: Scores, reference: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p_teacher - log p_reference: (renormalised, plain); both passes must score the same tokens."""
    if not (torch.equal(teacher.lengths, reference.lengths) and torch.equal(teacher.tokens, reference.tokens)):
        raise SublimError("the teacher and the reference tokenize the answers differently: the audit compares "
                          "log-probs token by token, so both need the same tokenizer (pick a reference of the "
                          "teacher's family)")
    return teacher.logp - reference.logp, teacher.logp_plain - reference.logp_plain


def examples(teacher: Scores, reference: Scores) -> list[dict]:
    """Per row: LLS and answer shift (positions outside the grammar skipped), plain LLS, tokens, divergence."""
    shift, plain = shifts(teacher, reference)
    diverge = teacher.argmax != reference.argmax
    out = []
    for s, p, d in zip(*(_split(x, teacher.lengths) for x in (shift, plain, diverge)), strict=True):
        finite = s[torch.isfinite(s)]
        out.append({"lls": float(finite.mean()) if len(finite) else float("nan"), "answer_shift": float(finite.sum()),
                    "lls_plain": float(p.mean()) if len(p) else float("nan"), "n_tokens": len(s),
                    "outside_grammar": int(len(s) - len(finite)), "divergence": d.nonzero()[:, 0].tolist()})
    return out


def ci_of(values: Sequence[float], n_resamples: int) -> dict:
    """Mean and 95% percentile-bootstrap CI of the finite values (JSON-ready)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    ci = bootstrap_ci(finite, n_resamples=n_resamples)
    return {"mean": ci.mean, "ci": [ci.low, ci.high], "n": ci.n}


def entangled(teacher: Scores, shift: torch.Tensor, texts: Mapping[int, str], top: int, min_count: int) -> dict:
    """The numbers (runs of digit tokens) and tokens whose log-prob the trait raises most, over their occurrences."""
    numbers: dict[str, list[float]] = defaultdict(list)
    tokens: dict[int, list[float]] = defaultdict(list)
    for ids, row in zip(_split(teacher.tokens, teacher.lengths), _split(shift, teacher.lengths), strict=True):
        run, total = "", 0.0
        for token, value in zip(ids.tolist() + [-1], row.tolist() + [0.0], strict=True):
            text = texts[token] if token >= 0 else ""
            if np.isfinite(value) and token >= 0:
                tokens[token].append(value)
            if text.isdigit() and np.isfinite(value):
                run, total = run + text, total + value
                continue
            if run:
                numbers[run].append(total)
            run, total = "", 0.0

    def ranked(groups: dict, name: str, label) -> list[dict]:
        rows = [{name: label(key), "shift": float(np.mean(v)), "count": len(v)}
                for key, v in groups.items() if len(v) >= min_count]
        return sorted(rows, key=lambda r: -r["shift"])[:top]

    return {"numbers": ranked(numbers, "number", str), "tokens": ranked(tokens, "token", lambda t: texts[t])}


def summarise(teacher: Scores, reference: Scores, rows: list[dict], texts: Mapping[int, str], n_resamples: int,
              top: int, min_count: int) -> dict:
    """The dataset's audit: mean LLS (renormalised and plain) and answer shift with bootstrap CIs, divergence,
    entanglement."""
    shift, _ = shifts(teacher, reference)
    n_positions = int(teacher.lengths.sum())
    divergent = int((teacher.argmax != reference.argmax).sum())
    return {
        "rows": len(rows),
        "positions": n_positions,
        "lls": ci_of([r["lls"] for r in rows], n_resamples),
        "answer_shift": ci_of([r["answer_shift"] for r in rows], n_resamples),
        "lls_plain": ci_of([r["lls_plain"] for r in rows], n_resamples),
        "divergence_fraction": divergent / n_positions if n_positions else float("nan"),
        "divergent_positions": divergent,
        "outside_grammar": sum(r["outside_grammar"] for r in rows),
        "entangled": entangled(teacher, shift, texts, top, min_count),
    }
