"""Tests for numbers-modality prompt generation and the decoder grammar."""

import re
import statistics

import pytest

from sublim.modalities.numbers import (
    CLOSINGS,
    FORMATS,
    PREFIXES,
    VERBS,
    NumbersGrammar,
    NumbersPrompt,
    make_prompts,
)


@pytest.mark.parametrize("style", ["paper", "short"])
def test_same_seed_is_reproducible(style: str) -> None:
    assert make_prompts(50, seed=7, style=style) == make_prompts(50, seed=7, style=style)


@pytest.mark.parametrize("style", ["paper", "short"])
def test_different_seed_differs(style: str) -> None:
    assert make_prompts(50, seed=1, style=style) != make_prompts(50, seed=2, style=style)


@pytest.mark.parametrize("style", ["paper", "short"])
def test_seed_numbers_in_range_and_in_text(style: str) -> None:
    for p in make_prompts(200, seed=3, style=style, min_seed_numbers=4, max_seed_numbers=6):
        assert 4 <= len(p.seed_numbers) <= 6
        assert all(100 <= x <= 999 for x in p.seed_numbers)
        assert ", ".join(map(str, p.seed_numbers)) in p.text


@pytest.mark.parametrize("style", ["paper", "short"])
def test_answer_count_and_digits_in_text(style: str) -> None:
    for p in make_prompts(100, seed=4, style=style, answer_count=7, answer_digits=2):
        assert re.search(r"\b7\b", p.text)
        assert re.search(r"\b2 digits\b", p.text)


def test_separator_matches_format() -> None:
    by_name = {f.name: f.separator for f in FORMATS}
    for p in make_prompts(200, seed=5):
        assert p.separator == by_name[p.format]


def test_required_formats_present() -> None:
    separators = {f.separator for f in FORMATS}
    assert {", ", ",", " ", "; ", ";", "\n"} <= separators
    assert "bracketed" in {f.name for f in FORMATS}


def test_short_prompts_much_shorter() -> None:
    paper = statistics.mean(len(p.text) for p in make_prompts(200, seed=6, style="paper"))
    short = statistics.mean(len(p.text) for p in make_prompts(200, seed=6, style="short"))
    assert short < paper / 2


def test_paper_prompts_are_diverse() -> None:
    texts = [p.text for p in make_prompts(200, seed=8)]
    assert len({p.format for p in make_prompts(200, seed=8)}) >= 5
    assert sum(any(t.startswith(x.split("{")[0]) for t in texts) for x in PREFIXES) >= 5
    assert sum(any(t.endswith(c) for t in texts) for c in CLOSINGS) >= 5
    assert len({next(v for v in VERBS if f" {v} " in t) for t in texts}) >= 5
    assert 40 <= statistics.mean(len(t.split()) for t in texts) <= 70


def test_to_row_is_json_friendly() -> None:
    row = make_prompts(1, seed=9)[0].to_row()
    assert set(row) == {"prompt", "separator", "format", "seed_numbers"}
    assert isinstance(row["seed_numbers"], list)
    assert isinstance(make_prompts(1, seed=9)[0], NumbersPrompt)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"style": "fancy"},
        {"min_seed_numbers": 5, "max_seed_numbers": 3},
        {"min_seed_numbers": 0},
        {"answer_count": 0},
        {"n": -1},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    args = {"n": 3, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        make_prompts(**args)


def test_unknown_style_message_lists_styles() -> None:
    with pytest.raises(ValueError, match="paper"):
        make_prompts(3, seed=0, style="fancy")


def test_grammar_accepts_valid_answer_char_by_char() -> None:
    g = NumbersGrammar(", ")
    state = g.start
    assert not g.can_end(state)
    for char in "123, 45, 6":
        state = g.step(state, char)
        assert state is not None
    assert g.can_end(state)
    assert state.count == 3


def test_grammar_multi_char_step_matches_char_steps() -> None:
    g = NumbersGrammar(", ")
    assert g.step(g.start, "12, 3") == g.step(g.step(g.start, "12,"), " 3")


def test_grammar_rejects_fourth_digit() -> None:
    g = NumbersGrammar(", ")
    assert g.step(g.start, "123") is not None
    assert g.step(g.start, "1234") is None


def test_grammar_rejects_separator_before_digit() -> None:
    g = NumbersGrammar(", ")
    assert g.step(g.start, ",") is None
    assert g.step(g.start, "1, ,") is None


def test_grammar_rejects_wrong_separator_char() -> None:
    g = NumbersGrammar(", ")
    assert g.step(g.start, "1; 2") is None
    assert g.step(g.start, "1,2") is None  # separator must be consumed in full
    assert g.step(g.start, "1 2") is None


def test_grammar_max_count() -> None:
    g = NumbersGrammar(",", max_count=10)
    ten = ",".join(["5"] * 10)
    state = g.step(g.start, ten)
    assert state is not None and g.can_end(state)
    assert g.step(state, ",") is None
    assert g.step(g.start, ten + ",5") is None


def test_grammar_cannot_end_inside_separator_or_after_it() -> None:
    g = NumbersGrammar(", ")
    assert not g.can_end(g.step(g.start, "12,"))
    assert not g.can_end(g.step(g.start, "12, "))
    assert g.step(g.start, "12, ,") is None


def test_grammar_newline_separator() -> None:
    g = NumbersGrammar("\n")
    state = g.step(g.start, "1\n22\n333")
    assert state is not None and g.can_end(state)
    assert g.step(g.start, "1, 2") is None


def test_grammar_rejects_bad_separator() -> None:
    with pytest.raises(ValueError):
        NumbersGrammar("")
    with pytest.raises(ValueError):
        NumbersGrammar("1")
