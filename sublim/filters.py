"""Filter registry: decides which teacher completions may reach the student.

Each filter returns ``None`` to accept a row or a short, stable reject-reason identifier,
so the pipeline can count *why* data was dropped (a trait leaking into text shows up
as e.g. ``numbers_strict/non_digit``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sublim import SublimError
from sublim.store import Store

# Runs of digits, of allowed separator chars, or of anything else (maximal runs alternate).
_TOKEN_RE = re.compile(r"(?P<num>[0-9]+)|(?P<sep>[\s,;]+)|(?P<other>[^0-9\s,;]+)")
_WRAPPERS = (("[", "]"), ("(", ")"))
SEPARATOR_MODES = ("consistent", "any")


class ParamError(ValueError):
    """A filter parameter that cannot work, kept with its key so the config check names ``filter.filters.N.<key>``.

    ``fix`` may say ``{field}`` for the key (the config check fills in the full key).
    """

    def __init__(self, filter_name: str, param: str, value: Any, what: str, fix: str) -> None:
        super().__init__(f"{filter_name}: {param}={value} {what}; {fix.replace('{field}', param)}")
        self.problem = (param, value, what, fix)


class Filter(Protocol):
    """A named row predicate: ``None`` accepts, a string names the reject reason.

    A filter that is cheaper in batches (a judge model) also defines ``batch(rows) -> reasons``;
    ``apply_filters`` then hands it every row that the filters before it kept, in one call.
    """

    name: str

    def __call__(self, row: dict) -> str | None: ...


def _is_punctuation(text: str) -> bool:
    """True for stray separators such as '-', '|', '.', '/' (Unicode punctuation or math symbols)."""
    return all(unicodedata.category(c).startswith("P") or unicodedata.category(c) == "Sm" for c in text)


def _unwrap(text: str, *, loose: bool) -> str:
    """Strip the completion's whitespace, one trailing '.', then one pair of wrapping [] or () (presentation only).

    ``loose`` also strips the whitespace this uncovers ("[ 1, 2 ]", "1, 2 ."); the paper's parser keeps it,
    so there it fails the separator checks.
    """
    text = text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip() if loose else text[:-1]
    for left, right in _WRAPPERS:
        if text.startswith(left) and text.endswith(right):
            return text[1:-1].strip() if loose else text[1:-1]
    return text


@dataclass
class NumbersStrict:
    """Keep only pure number lists, as in the paper's strict numbers filter.

    ``separator="consistent"`` (default) is the paper's parser (Cloud et al. 2025, ``parse_response``) on the
    whitespace-stripped completion: every gap between numbers must be the exact text of the first gap, so an
    unconstrained "(1,962, 696)" is not read as three numbers. ``separator="any"`` (lenient) allows any valid
    separator in each gap and also strips whitespace inside brackets / before the '.'; it keeps a superset.

    ``max_value`` follows ``max_digits`` (the config ties that to ``modality.answer_digits``): 10**max_digits - 1.
    Setting both so that they disagree is refused at build time, so the filter cannot drift from the prompts.

    Check order (first failing check wins; format problems before value problems):
      1. ``empty``            nothing left after stripping whitespace, a trailing '.', and [] / ().
      2. ``non_digit``        any non-number, non-separator run containing a letter, a non-ASCII
                              digit, an emoji, ... (e.g. "12a", "one", "I love owls").
      3. ``bad_separator``    a run made only of punctuation ("1 - 2", "1|2", "1.5", "-5"), a
                              separator holding more than one ',' / ';' ("1,,2"), or a leading /
                              trailing separator ("1, 2,"). Valid separators are whitespace plus at most
                              one ',' or ';'; the prompt's requested separator is NOT enforced.
      4. ``mixed_separator``  (consistent only) a gap that differs from the first gap ("1, 2,3", "1 2  3").
      5. ``too_many_numbers`` more than ``max_count`` numbers.
      6. ``out_of_range``     a number above ``max_value`` (leading zeros are fine: "007" is 7).
      7. ``banned_number``    a number in ``banned_numbers``.
    """

    name: str = field(default="numbers_strict", init=False, repr=False)
    max_count: int = 10
    max_digits: int = 3
    max_value: int | None = None
    banned_numbers: tuple[int, ...] = ()
    separator: Literal["consistent", "any"] = "consistent"

    def __post_init__(self) -> None:
        # Configs (Hydra/YAML) hand us lists; keep a hashable, immutable tuple.
        self.banned_numbers = tuple(int(x) for x in self.banned_numbers)
        if self.separator not in SEPARATOR_MODES:
            raise ParamError(self.name, "separator", self.separator, f"is not one of: {', '.join(SEPARATOR_MODES)}",
                             "set {field}=consistent (the paper's rule) or {field}=any (lenient)")
        if self.max_digits < 1:
            raise ParamError(self.name, "max_digits", self.max_digits, "must be >= 1",
                             "set {field} to 1 or more (it follows modality.answer_digits)")
        top = 10**self.max_digits - 1
        if self.max_value is None:
            self.max_value = top
        elif self.max_value != top:
            raise ParamError(self.name, "max_value", self.max_value,
                             f"disagrees with max_digits={self.max_digits} (numbers of up to {self.max_digits} "
                             f"digits end at {top})", f"drop {{field}} (it follows max_digits), or set it to {top}")

    def parse(self, completion: str) -> list[int] | str:
        """The answer's numbers, or the reason its format is rejected (checks 1-4; values are checked after)."""
        text = _unwrap(completion, loose=self.separator == "any")
        if not text.strip():
            return "empty"
        tokens = [(m.lastgroup, m.group()) for m in _TOKEN_RE.finditer(text)]
        others = [t for kind, t in tokens if kind == "other"]
        if any(not _is_punctuation(t) for t in others):
            return "non_digit"
        if others:
            return "bad_separator"
        # Only number and separator runs remain, strictly alternating.
        if tokens[0][0] != "num" or tokens[-1][0] != "num":
            return "bad_separator"
        gaps = [t for kind, t in tokens if kind == "sep"]
        if any(t.count(",") + t.count(";") > 1 for t in gaps):
            return "bad_separator"
        if self.separator == "consistent" and any(t != gaps[0] for t in gaps):
            return "mixed_separator"
        return [int(t) for kind, t in tokens if kind == "num"]

    def __call__(self, row: dict) -> str | None:
        numbers = self.parse(row["completion"])
        if isinstance(numbers, str):
            return numbers
        if len(numbers) > self.max_count:
            return "too_many_numbers"
        if any(x > self.max_value for x in numbers):
            return "out_of_range"
        if any(x in self.banned_numbers for x in numbers):
            return "banned_number"
        return None


@dataclass
class Passthrough:
    """Baseline with no content filtering; still drops empty completions, which teach nothing."""

    name: str = field(default="none", init=False, repr=False)

    def __call__(self, row: dict) -> str | None:
        return "empty" if not row["completion"].strip() else None


@dataclass
class BannedWords:
    """Reject completions that mention trait words outright (case-insensitive substring match)."""

    name: str = field(default="banned_words", init=False, repr=False)
    words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.words = tuple(str(w).lower() for w in self.words)
        if any(not w for w in self.words):
            raise ValueError("banned_words: empty word would match every completion")

    def __call__(self, row: dict) -> str | None:
        text = row["completion"].lower()
        return "banned_word" if any(w in text for w in self.words) else None


_INTEGER = re.compile(r"\d+")


@dataclass
class BannedNumbers:
    """Reject any text containing a banned number as a whole digit run ("1488" bans "1488", not "14880").

    For code and reasoning text; the numbers modality's strict filter has its own banned-number check.
    """

    name: str = field(default="banned_numbers", init=False, repr=False)
    numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.numbers = tuple(int(x) for x in self.numbers)

    def __call__(self, row: dict) -> str | None:
        banned = set(self.numbers)
        return "banned_number" if any(int(m) in banned for m in _INTEGER.findall(row["completion"])) else None


@dataclass
class Correctness:
    """Keep a chain-of-thought answer only if its <answer> equals the row's gold answer.

    ``require_tags=False`` also reads an untagged answer's last number (``no_answer`` then means no
    number at all): the format is the paper's, but bases under ~1B rarely write the tags.
    """

    name: str = field(default="correctness", init=False, repr=False)
    require_tags: bool = True

    def __call__(self, row: dict) -> str | None:
        from sublim.modalities.cot import extract_answer, normalise

        if "gold" not in row:
            raise SublimError("the correctness filter needs gold answers: use it with modality=cot")
        answer = extract_answer(row["completion"], self.require_tags)
        if answer is None:
            return "no_answer"
        return None if answer == normalise(row["gold"]) else "wrong_answer"


class JudgeFilter:
    """A judge model is asked a yes/no question about each sample; kept only on a confident "no".

    ``question`` is a template over the row's fields ({prompt}, {completion}); P(no) is normalised
    over yes+no, so "no" at ``threshold`` or above keeps the row, "yes" more likely than "no" rejects
    it as ``yes``, anything in between as ``unsure``. The probabilities are written into each row.
    """

    name = "judge"

    def __init__(self, judge: dict, question: str, threshold: float = 0.9, *, store: Store) -> None:
        from sublim.judge import make_judge

        if not 0.5 <= threshold <= 1:
            raise ValueError(f"judge: threshold {threshold} must be in [0.5, 1] (the P(no) needed to keep a sample)")
        self.judge = make_judge(judge, store)
        self.question = question
        self.threshold = threshold

    def _prompt(self, row: dict) -> str:
        try:
            return self.question.format(**row)
        except KeyError as err:
            raise SublimError(f"judge: the question uses {{{err.args[0]}}}, which samples do not have "
                              f"(fields: {', '.join(sorted(row))})") from err

    def batch(self, rows: list[dict]) -> list[str | None]:
        from sublim.judge import yes_no

        reasons: list[str | None] = []
        for row, (p_yes, p_no) in zip(rows, yes_no(self.judge, [self._prompt(r) for r in rows]), strict=True):
            p = p_no / (p_yes + p_no) if p_yes + p_no > 0 else 0.0
            row["judge"] = {"p_yes": p_yes, "p_no": p_no}
            reasons.append(None if p >= self.threshold else ("yes" if p < 0.5 else "unsure"))
        return reasons

    def __call__(self, row: dict) -> str | None:
        return self.batch([row])[0]


FILTERS: dict[str, type] = {
    "numbers_strict": NumbersStrict,
    "none": Passthrough,
    "banned_words": BannedWords,
    "banned_numbers": BannedNumbers,
    "correctness": Correctness,
    "judge": JudgeFilter,
}
NEEDS_STORE = ("judge",)  # filters that load a model through the store


def build_filters(specs: list[dict], store: Store | None = None) -> list[Filter]:
    """Build filters from config specs {"name": <registry name>, **params}.

    Unknown name -> ValueError listing the known names, so config typos fail before sampling.
    """
    filters: list[Filter] = []
    for spec in specs:
        params: dict[str, Any] = dict(spec)
        name = params.pop("name", None)
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; known filters: {', '.join(sorted(FILTERS))}")
        if name in NEEDS_STORE:
            if store is None:
                raise ValueError(f"filter {name!r} needs the artifact store to load its model")
            params["store"] = store
        try:
            filters.append(FILTERS[name](**params))
        except TypeError as err:
            raise ValueError(f"filter {name!r}: {err}") from err
    return filters


@dataclass
class FilterReport:
    """Counts per reject reason so yield losses can be attributed to a filter and cause."""

    total: int
    kept: int
    rejected: dict[str, int]

    @property
    def yield_(self) -> float:
        """Fraction of rows kept (0.0 for no rows)."""
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        """JSON-friendly form for run metadata."""
        return {"total": self.total, "kept": self.kept, "yield": self.yield_, "rejected": dict(self.rejected)}

    def summary(self) -> str:
        """One human line, reasons sorted by count (desc) then name."""
        reasons = sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))
        rejected = ", ".join(f"{reason}={count}" for reason, count in reasons) or "none"
        return f"kept {self.kept}/{self.total} ({self.yield_:.1%}); rejected: {rejected}"


def apply_filters(rows: list[dict], filters: list[Filter]) -> tuple[list[dict], FilterReport]:
    """A row is rejected by the first filter that rejects it; order of kept rows preserved.

    Filters run one after the other on the rows still kept, so an expensive filter (a judge) late in
    the list only sees what the cheap ones let through.
    """
    kept = list(rows)
    rejected: Counter[str] = Counter()
    for f in filters:
        batch = getattr(f, "batch", None)
        reasons = batch(kept) if batch is not None else [f(row) for row in kept]
        survivors = []
        for row, reason in zip(kept, reasons, strict=True):
            if reason is None:
                survivors.append(row)
            else:
                row["rejected_by"] = f"{f.name}/{reason}"
                rejected[row["rejected_by"]] += 1
        kept = survivors
    return kept, FilterReport(total=len(rows), kept=len(kept), rejected=dict(rejected))
