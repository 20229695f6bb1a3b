"""Tests for the filter registry and the strict numbers filter."""

import pytest

from sublim.filters import (
    FILTERS,
    BannedWords,
    FilterReport,
    NumbersStrict,
    Passthrough,
    apply_filters,
    build_filters,
)


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
        "1, 2;3 4\n5",
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
        ("1000", "out_of_range"),
        ("1, 2, 1000", "out_of_range"),
        (", ".join(["1"] * 11), "too_many_numbers"),
    ],
)
def test_numbers_strict_rejects(completion: str, reason: str) -> None:
    assert NumbersStrict()(row(completion)) == reason


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
