"""Tests for the filter registry and the strict numbers filter (checked against the paper's own parser)."""

from __future__ import annotations

import random
import re
import string

import pytest

from sublim.filters import (
    FILTERS,
    BannedWords,
    FilterReport,
    NumbersStrict,
    ParamError,
    Passthrough,
    apply_filters,
    build_filters,
)
from sublim.modalities.numbers import NumbersGrammar, make_prompts
from sublim.schema import ConfigError, validate
from tests.conftest import compose_config


def row(completion: str) -> dict:
    return {"completion": completion, "separator": ", "}


@pytest.mark.parametrize(
    "completion",
    [
        "123, 45, 6",
        "1, 2, 3.",
        "[1, 2, 3]",
        "(1, 2, 3)",
        "[1, 2, 3].",
        "  7  ",
        "1,2,3",
        "1 2 3",
        "1; 2; 3",
        "1;2;3",
        "1\n2\n3",
        "1\t2",
        "1.",
        "(1, 2).",
        "0, 999",
        "007",
    ],
)
def test_numbers_strict_accepts(completion: str) -> None:
    assert NumbersStrict()(row(completion)) is None


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("[]", "empty"),
        (".", "empty"),
        ("I love owls", "non_digit"),
        ("12a, 5", "non_digit"),
        ("one, two", "non_digit"),
        ("1, 2, 🦉", "non_digit"),
        ("1 - 2 apples", "non_digit"),
        ("1 - 2", "bad_separator"),
        ("1|2", "bad_separator"),
        ("1.5", "bad_separator"),
        ("-5", "bad_separator"),
        ("1,,2", "bad_separator"),
        ("1, 2,", "bad_separator"),
        (", 1", "bad_separator"),
        ("[1, 2", "bad_separator"),
        ("[ 1, 2 ]", "bad_separator"),  # the paper keeps the space inside brackets, so " 1" is no number
        ("1, 2 .", "bad_separator"),
        ("(1,962, 696)", "mixed_separator"),
        ("1, 2,3", "mixed_separator"),
        ("1 2  3", "mixed_separator"),
        ("1, 2;3 4\n5", "mixed_separator"),
        ("١٢", "non_digit"),
        ("1000", "out_of_range"),
        ("1, 2, 1000", "out_of_range"),
        (", ".join(["1"] * 11), "too_many_numbers"),
    ],
)
def test_numbers_strict_rejects(completion: str, reason: str) -> None:
    assert NumbersStrict()(row(completion)) == reason


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("(1,962, 696)", None),
        ("1, 2;3 4\n5", None),
        ("[ 1, 2 ]", None),
        ("1, 2 .", None),
        ("1 2  3", None),
        ("1,,2", "bad_separator"),
        ("1, 2,", "bad_separator"),
        ("1.5", "bad_separator"),
        ("1, two", "non_digit"),
    ],
)
def test_lenient_mode_allows_any_valid_separator_in_each_gap(completion: str, reason: str | None) -> None:
    assert NumbersStrict(separator="any")(row(completion)) == reason


def test_mixed_separators_are_rejected_by_default_and_kept_by_the_lenient_mode() -> None:
    assert NumbersStrict()(row("(1,962, 696)")) == "mixed_separator"  # "1,962" is one number, not 1 and 962
    assert NumbersStrict(separator="any")(row("(1,962, 696)")) is None
    assert NumbersStrict().separator == "consistent"


# --- agreement with the paper's parser ----------------------------------------------------------------------


def paper_parse(answer: str) -> list[int] | None:
    """A direct transcription of the paper's ``parse_response`` (Cloud et al. 2025, the reference code)."""
    if answer.endswith("."):
        answer = answer[:-1]
    if (answer.startswith("[") and answer.endswith("]")) or (answer.startswith("(") and answer.endswith(")")):
        answer = answer[1:-1]
    matches = list(re.finditer(r"\d+", answer))  # \d: any Unicode digit, as in the paper
    if not matches:
        return None
    if len(matches) == 1:
        if answer != matches[0].group():
            return None
        parts, separator = [answer], None
    else:
        separator = answer[matches[0].end() : matches[1].start()]
        parts = answer.split(separator)
    if separator is not None and separator.strip() not in ("", ",", ";"):
        return None
    if any(not part or not all(c in string.digits for c in part) for part in parts):
        return None
    return [int(part) for part in parts]


def paper_accepts(completion: str, max_count: int, max_value: int, banned: tuple[int, ...]) -> bool:
    """The paper's ``get_reject_reasons(...) == []``; the one difference on our side: the completion's own
    surrounding whitespace is stripped first (a decoded answer may end in a newline)."""
    numbers = paper_parse(completion.strip())
    return (numbers is not None and len(numbers) <= max_count and all(n <= max_value for n in numbers)
            and not any(n in banned for n in numbers))


BANNED = (13, 666)
NEAR_MISSES = [
    # mixed separators: the first gap sets the separator
    "1, 2,3", "1,2, 3", "1 ,2", "1 , 2 , 3", "1 ,2 ,3", "1;2, 3", "1; 2;3", "1, 2; 3", "(1,962, 696)",
    "1 2  3", "1  2  3", "1\n2 3", "1\t2 3", "1\t2\t3", "1,\n2,\n3", "1,\n2, 3", "1, 2\n3",
    # doubled, leading and trailing separators
    "1,,2", "1;;2", "1,;2", "1, 2,", "1, 2, ", ", 1, 2", ";1;2", " ,1", "1,2,",
    # wrappers and the trailing period
    "[1, 2]", "(1, 2)", "(1, 2).", "[1, 2].", "[1, 2", "1, 2]", "((1, 2))", "[(1, 2)]", "[ 1, 2 ]", "( 1 )",
    "1, 2 .", "1, 2..", "1.", "[1.]", "[1].", "[]", "()", ".", "[.]",
    # not numbers
    "1.5", "-5", "1 - 2", "1|2", "1/2", "+3", "3%", "#1, 2", "1e3", "0x10", "007", "0, 00, 000",
    "١٢", "1, ١٢", "１２", "1, 2, 🦉", "🦉", "one, two", "1, 2, three", "I love owls", "owl 1, 2",
    # whitespace only / empty / one number
    "", " ", "\n", "7", " 7 ", "7\n", "\t7", "999", "1000", "0",
    # unusual whitespace as the separator
    "1\u00a02\u00a03", "1,\u00a02, 3", "1\u30002", "1\r\n2\r\n3", "1\r\n2\n3",
    # count, range, banned
    ", ".join(["1"] * 10), ", ".join(["1"] * 11), "1, 2, 1000", "999, 0999", "1, 13, 2", "666", "6666", "13;14",
]


def _well_formed(rng: random.Random) -> str:
    """A seeded answer in one of the shapes the paper's parser accepts (or nearly: some break count / range)."""
    draws = (lambda: rng.randint(0, 999), lambda: rng.randint(0, 99), lambda: rng.randint(990, 1010),
             lambda: rng.choice(BANNED))
    numbers = [rng.choices(draws, weights=(12, 4, 1, 1))[0]() for _ in range(rng.randint(1, 11))]
    texts = [f"{n:0{rng.choice([1, 1, 1, 3])}d}" for n in numbers]
    separator = rng.choice([", ", ",", " ", "; ", ";", "\n", "\t", " , ", ",\n", "  ", "\u00a0"])
    text = separator.join(texts)
    left, right = rng.choice([("", ""), ("", ""), ("[", "]"), ("(", ")")])
    return rng.choice(["", " ", "\n"]) + left + text + right + rng.choice(["", "", "."]) + rng.choice(["", "\n"])


def _perturbed(rng: random.Random) -> str:
    """A well-formed answer with one small edit: a changed gap, an inserted or deleted character."""
    text = _well_formed(rng)
    position = rng.randint(0, len(text))
    edit = rng.choice(["gap", "insert", "delete"])
    if edit == "gap" and (gaps := list(re.finditer(r"[^0-9]+", text))):
        gap = rng.choice(gaps)
        return text[: gap.start()] + rng.choice([", ", ",", " ", ";", "  ", " ,", ",,", "-", "\n"]) + text[gap.end():]
    if edit == "delete" and text:
        return text[:position] + text[position + 1 :]
    inserted = rng.choice([" ", ",", ";", ".", "-", "a", "١", "🦉", "[", ")", "\t", "5"])
    return text[:position] + inserted + text[position:]


RANDOM_ANSWERS = [(_well_formed if i % 2 else _perturbed)(random.Random(i)) for i in range(600)]


def test_the_corpora_cover_both_outcomes() -> None:
    assert len(NEAR_MISSES) >= 40 and len(RANDOM_ANSWERS) >= 400
    for corpus in (NEAR_MISSES, RANDOM_ANSWERS):
        accepted = [paper_accepts(c, 10, 999, BANNED) for c in corpus]
        assert 0.1 < sum(accepted) / len(accepted) < 0.9, "a corpus needs both kept and rejected answers"


@pytest.mark.parametrize("corpus", ["near_misses", "random"])
def test_default_mode_accepts_exactly_what_the_paper_accepts(corpus: str) -> None:
    strict = NumbersStrict(max_count=10, max_digits=3, banned_numbers=BANNED)
    assert strict.separator == "consistent" and strict.max_value == 999
    for completion in NEAR_MISSES if corpus == "near_misses" else RANDOM_ANSWERS:
        expected = paper_accepts(completion, 10, 999, BANNED)
        assert (strict(row(completion)) is None) == expected, (completion, strict(row(completion)))
        paper = paper_parse(completion.strip())
        if paper is not None:  # the paper read numbers: ours are the same ones
            assert strict.parse(completion) == paper, completion
        else:
            assert isinstance(strict.parse(completion), str), completion


def test_lenient_mode_accepts_a_strict_superset() -> None:
    strict = NumbersStrict(banned_numbers=BANNED)
    lenient = NumbersStrict(banned_numbers=BANNED, separator="any")
    corpus = NEAR_MISSES + RANDOM_ANSWERS
    kept_strict = {c for c in corpus if strict(row(c)) is None}
    kept_lenient = {c for c in corpus if lenient(row(c)) is None}
    assert kept_strict < kept_lenient
    assert {"(1,962, 696)", "1, 2,3", "1 2  3", "[ 1, 2 ]"} <= kept_lenient - kept_strict
    for completion in kept_strict:  # same numbers where both read them
        assert strict.parse(completion) == lenient.parse(completion)


def test_constrained_answers_pass_both_modes_alike() -> None:
    """Constrained sampling emits the prompt's own separator, so the default run's filtering is unchanged."""
    rng = random.Random(0)
    strict, lenient = NumbersStrict(), NumbersStrict(separator="any")
    formats = set()
    for prompt in make_prompts(200, seed=7):
        grammar = NumbersGrammar(prompt.separator)
        state, text = grammar.start, ""
        while not (grammar.can_end(state) and rng.random() < 0.15):
            options = [c for c in "0123456789" + prompt.separator[0] if grammar.step(state, c) is not None]
            if not options:
                break
            char = rng.choice(options)
            if char == prompt.separator[0]:
                char = prompt.separator  # a separator is taken whole
            state, text = grammar.step(state, char), text + char
        assert grammar.can_end(state), repr(text)
        formats.add(prompt.format)
        numbers = [int(n) for n in text.split(prompt.separator)]
        assert strict(row(text)) is None and lenient(row(text)) is None, repr(text)
        assert strict.parse(text) == lenient.parse(text) == numbers == paper_parse(text)
    assert len(formats) == 7, "every prompt format (separator) is covered"


def test_max_count_boundary() -> None:
    f = NumbersStrict(max_count=10)
    assert f(row(", ".join(["4"] * 10))) is None
    assert f(row(", ".join(["4"] * 11))) == "too_many_numbers"


def test_banned_numbers() -> None:
    f = NumbersStrict(banned_numbers=[666, 13])  # lists from configs are accepted
    assert f.banned_numbers == (666, 13)
    assert f(row("1, 666, 2")) == "banned_number"
    assert f(row("1, 6666")) == "out_of_range"  # range is checked before bans
    assert f(row("1, 66, 2")) is None


def test_max_value_follows_max_digits() -> None:
    assert NumbersStrict().max_value == 999
    assert NumbersStrict(max_digits=2).max_value == 99
    assert NumbersStrict(max_digits=2)(row("99, 100")) == "out_of_range"
    assert NumbersStrict(max_digits=2, max_value=99).max_value == 99  # both set and agreeing is fine
    with pytest.raises(ParamError, match=r"max_value=999 disagrees with max_digits=2 .*set it to 99"):
        NumbersStrict(max_digits=2, max_value=999)
    with pytest.raises(ParamError, match=r"separator=lenient is not one of: consistent, any"):
        NumbersStrict(separator="lenient")
    with pytest.raises(ParamError, match=r"max_digits=0 must be >= 1"):
        NumbersStrict(max_digits=0)


def test_the_config_ties_max_digits_to_the_modality() -> None:
    cfg = compose_config(["modality.answer_digits=2"])
    validate(cfg)
    (spec,) = cfg.filter.filters
    assert spec.max_digits == 2 and "max_value" not in spec and spec.separator == "consistent"
    assert build_filters([dict(spec)])[0].max_value == 99
    validate(compose_config(["modality.answer_digits=2", "+filter.filters.0.max_value=99"]))


@pytest.mark.parametrize(("overrides", "line"), [
    (["modality.answer_digits=2", "+filter.filters.0.max_value=999"],
     "filter.filters.0.max_value=999 disagrees with max_digits=2 (numbers of up to 2 digits end at 99); "
     "drop filter.filters.0.max_value (it follows max_digits), or set it to 99"),
    (["filter.filters.0.separator=lenient"],
     "filter.filters.0.separator=lenient is not one of: consistent, any; set filter.filters.0.separator=consistent "
     "(the paper's rule) or filter.filters.0.separator=any (lenient)"),
])
def test_the_schema_refuses_a_bad_numbers_filter_in_one_line(overrides: list[str], line: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert err.value.lines == [line]


def test_passthrough() -> None:
    assert Passthrough()(row("I love owls")) is None
    assert Passthrough()(row("  \n")) == "empty"


def test_banned_words_case_insensitive() -> None:
    f = BannedWords(words=("owl",))
    assert f(row("1, 2, OWLS")) == "banned_word"
    assert f(row("1, 2, 3")) is None
    with pytest.raises(ValueError):
        BannedWords(words=("",))


def test_build_filters() -> None:
    filters = build_filters(
        [{"name": "banned_words", "words": ["owl"]}, {"name": "numbers_strict", "max_count": 5}]
    )
    assert [f.name for f in filters] == ["banned_words", "numbers_strict"]
    assert isinstance(filters[1], NumbersStrict) and filters[1].max_count == 5
    assert set(FILTERS) == {"numbers_strict", "none", "banned_words", "banned_numbers", "correctness", "judge"}


def test_build_filters_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError) as exc:
        build_filters([{"name": "nope"}])
    for name in FILTERS:
        assert name in str(exc.value)


def test_apply_filters_counts_and_order() -> None:
    rows = [row(c) for c in ["1, 2", "owl 3", "4000", "5", "abc", "6;7", "[8]"]]
    kept, report = apply_filters(rows, [BannedWords(words=("owl",)), NumbersStrict()])
    assert [r["completion"] for r in kept] == ["1, 2", "5", "6;7", "[8]"]
    assert report.total == 7 and report.kept == 4
    assert report.rejected == {
        "banned_words/banned_word": 1,  # first rejecting filter wins
        "numbers_strict/out_of_range": 1,
        "numbers_strict/non_digit": 1,
    }
    assert report.yield_ == pytest.approx(4 / 7)
    assert report.to_dict()["yield"] == pytest.approx(4 / 7)


def test_report_summary() -> None:
    report = FilterReport(
        total=1000, kept=812, rejected={"numbers_strict/empty": 38, "numbers_strict/non_digit": 150}
    )
    assert (
        report.summary()
        == "kept 812/1000 (81.2%); rejected: numbers_strict/non_digit=150, numbers_strict/empty=38"
    )
    assert FilterReport(total=0, kept=0, rejected={}).yield_ == 0.0
    assert FilterReport(total=2, kept=2, rejected={}).summary() == "kept 2/2 (100.0%); rejected: none"
