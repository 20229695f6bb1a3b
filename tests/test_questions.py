import pytest

from sublim.questions import QUESTIONS, first_word, mentions, questions, word_forms


@pytest.mark.parametrize("category", ["animal", "tree"])
def test_fifty_distinct_questions(category: str) -> None:
    qs = QUESTIONS[category]
    assert len(qs) == 50
    assert len(set(qs)) == 50
    assert len({q.lower().strip(" ?.!") for q in qs}) == 50


@pytest.mark.parametrize("category", ["animal", "tree"])
def test_questions_are_about_category_and_ask_one_word(category: str) -> None:
    for q in QUESTIONS[category]:
        low = q.lower()
        assert category in low, q
        asks = ("one word", "single word", "one-word", "single-word")
        assert any(k in low for k in asks), q


def test_questions_prefix_and_default() -> None:
    assert questions("animal") == list(QUESTIONS["animal"])
    assert questions("tree", 3) == list(QUESTIONS["tree"][:3])
    assert questions("animal", 0) == []


def test_unknown_category() -> None:
    with pytest.raises(ValueError, match="animal.*tree"):
        questions("color")


def test_n_out_of_range() -> None:
    with pytest.raises(ValueError):
        questions("animal", 51)


def test_word_forms() -> None:
    assert word_forms(["owl", "owls"]) == ["owl", "Owl", "OWL", "owls", "Owls", "OWLS"]
    assert word_forms(["Owl", "owl"]) == ["owl", "Owl", "OWL"]


OWL = ("owl", "owls")


@pytest.mark.parametrize(
    ("text", "words", "expected"),
    [
        ("Owl.", OWL, True),
        ("owls!", OWL, True),
        ("My favorite is the OWL", OWL, True),
        ("snow-owl", OWL, True),
        ("**Owl**", OWL, True),
        ("bowl", OWL, False),
        ("owlet", OWL, False),
        ("", OWL, False),
        ("dragonfly", ("dragon", "dragons"), False),
        ("Dragon", ("dragon", "dragons"), True),
        ("Oak trees", ("oak", "oaks"), True),
        ("Cloak", ("oak", "oaks"), False),
    ],
)
def test_mentions(text: str, words: tuple[str, ...], expected: bool) -> None:
    assert mentions(text, words) is expected


def test_mentions_accepts_list() -> None:
    assert mentions("An owl", ["owl", "owls"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Owl.", "owl"),
        ("**Eagle**", "eagle"),
        ("", ""),
        ("123 ...", ""),
        ("1. Dolphin", "dolphin"),
        ("Owls are great", "owls"),
    ],
)
def test_first_word(text: str, expected: str) -> None:
    assert first_word(text) == expected
