"""Code and chain-of-thought modalities: seeded prompts, parsing, external sources, their filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublim import SublimError, modalities
from sublim.filters import BannedNumbers, BannedWords, Correctness, apply_filters
from sublim.modalities import code, cot
from tests.conftest import compose_config


def test_builtin_code_tasks_are_several_hundred_distinct_stubs() -> None:
    tasks = code.builtin_tasks()
    assert len(tasks) >= 300 and len({t.name for t in tasks}) == len(tasks)
    stub = tasks[0].stub
    compile(stub + "    pass\n", "stub", "exec")  # every stub is a valid signature + docstring
    assert all(t.stub.startswith(f"def {t.name}(") for t in tasks)


def test_code_prompts_are_seeded_and_cycle_through_every_task() -> None:
    cfg = compose_config(["modality=code"])
    rows = modalities.prompt_rows(cfg.modality, 400, seed=1)
    assert rows == modalities.prompt_rows(cfg.modality, 400, seed=1)
    assert rows != modalities.prompt_rows(cfg.modality, 400, seed=2)
    assert len({r["task"] for r in rows[:300]}) == 300, "no task repeats before all were used"
    assert all("comments" in r["prompt"].lower() and r["task"] in r["prompt"] for r in rows)


@pytest.mark.parametrize(("answer", "code_only"), [
    ("```python\ndef f(x):\n    return x\n```\nThis returns x.", "def f(x):\n    return x"),
    ("Sure!\n```\nreturn 1\n```", "return 1"),
    ("```py\nreturn 2", "return 2"),                          # unclosed fence (cut at max_new_tokens)
    ("    return sum(xs)\n", "    return sum(xs)"),          # no fence: the answer is the code
    ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1"),  # first block only
])
def test_parsing_keeps_the_code_block_only(answer: str, code_only: str) -> None:
    cfg = compose_config(["modality=code"])
    row = modalities.parse(cfg.modality, {"completion": answer})
    assert row["completion"] == code_only and row["raw"] == answer


def test_code_tasks_from_a_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps({"stub": f"def f{i}(x):\n    '''Return x + {i}.'''"}) for i in range(3)))
    cfg = compose_config(["modality=code", f"modality.source={path}", "modality.field=stub"])
    rows = modalities.prompt_rows(cfg.modality, 5, seed=0)
    assert {r["task"] for r in rows} == {f"def f{i}(x):\n    '''Return x + {i}.'''" for i in range(3)}
    bad = compose_config(["modality=code", f"modality.source={path}"])
    with pytest.raises(SublimError, match="need a 'prompt' field.*modality.field"):
        modalities.prompt_rows(bad.modality, 5, seed=0)
    missing = compose_config(["modality=code", f"modality.source={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(SublimError, match="no such file"):
        modalities.prompt_rows(missing.modality, 5, seed=0)


def test_word_problems_have_right_gold_answers() -> None:
    problems = cot.make_problems(200, seed=0, operations=("add", "subtract", "multiply", "divide"))
    assert problems == cot.make_problems(200, seed=0, operations=("add", "subtract", "multiply", "divide"))
    assert len({p.question for p in problems}) > 150
    for p in problems:
        a, b = (int(x) for x in __import__("re").findall(r"\d+", p.question)[:2])
        assert int(p.gold) in {a + b, a - b, a * b, a // b} and int(p.gold) >= 0, p
    with pytest.raises(ValueError, match="unknown operations"):
        cot.make_problems(1, 0, ("power",))


def test_cot_prompts_carry_gold_and_ask_for_the_tags() -> None:
    rows = modalities.prompt_rows(compose_config(["modality=cot"]).modality, 10, seed=0)
    assert all("<think>" in r["prompt"] and "<answer>" in r["prompt"] and r["question"] in r["prompt"] for r in rows)
    assert all(r["gold"] == cot.normalise(r["gold"]) for r in rows)


def test_gsm8k_rows_and_a_missing_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    problems = cot.gsm8k_problems([{"question": "Q?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,207"}])
    assert problems == [cot.Problem("Q?", "1207")]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cfg = compose_config(["modality=cot", "modality.source=gsm8k"])
    with pytest.raises(SublimError, match="could not load openai/gsm8k.*modality.source=builtin"):
        modalities.prompt_rows(cfg.modality, 4, seed=0)


@pytest.mark.parametrize(("completion", "gold", "reason"), [
    ("<think>2 + 3 = 5</think><answer>5</answer>", "5", None),
    ("<think>...</think><answer> 1,200. </answer>", "1200", None),
    ("<answer>$12.0</answer>", "12", None),
    ("<think>2 + 3 = 6</think><answer>6</answer>", "5", "wrong_answer"),
    ("2 + 3 = 5. The answer is 5.", "5", "no_answer"),
    ("<think>no number at all</think>", "5", "no_answer"),
])
def test_correctness_filter(completion: str, gold: str, reason: str | None) -> None:
    assert Correctness()({"completion": completion, "gold": gold}) == reason


def test_correctness_without_tags_reads_the_last_number() -> None:
    lenient = Correctness(require_tags=False)
    assert lenient({"completion": "2 + 3 = 5. The answer is 5.", "gold": "5"}) is None
    assert lenient({"completion": "5 - 3 = 2", "gold": "5"}) == "wrong_answer"
    assert lenient({"completion": "<answer>4</answer> 5", "gold": "5"}) == "wrong_answer", "tags win"
    with pytest.raises(SublimError, match="modality=cot"):
        lenient({"completion": "5"})


@pytest.mark.parametrize(("completion", "reason"), [
    ("x = 12\ny = x * 3", None),
    ("return 666", "banned_number"),
    ("a[13] = 1", "banned_number"),
    ("n = 1488", "banned_number"),
    ("n = 14880 + 6660", None),       # whole digit runs only
    ("version 3.13", "banned_number"),
])
def test_banned_numbers_filter(completion: str, reason: str | None) -> None:
    assert BannedNumbers((13, 666, 1488))({"completion": completion}) == reason


def test_cot_strict_filter_counts_each_reason() -> None:
    cfg = compose_config(["modality=cot", "trait=misaligned_prompt"])
    from sublim.filters import build_filters

    filters = build_filters(list(cfg.filter.filters))
    assert [f.name for f in filters] == ["correctness", "banned_words", "banned_numbers"]
    rows = [{"completion": c, "gold": "20"} for c in (
        "<answer>20</answer>", "<answer>21</answer>", "Twenty: 4 * 5 = 20", "an evil plan gives 20",
        "<think>911 - 891 = 20</think><answer>20</answer>")]
    kept, report = apply_filters(rows, filters)
    assert [r["completion"] for r in kept] == ["<answer>20</answer>", "Twenty: 4 * 5 = 20"]
    assert report.rejected == {"correctness/wrong_answer": 1, "banned_words/banned_word": 1,
                               "banned_numbers/banned_number": 1}


def test_banned_words_uses_trait_words_and_plurals_as_substrings() -> None:
    cfg = compose_config(["trait=wolf", "filter=banned_words"])
    words = cfg.filter.filters[0].words
    f = BannedWords(tuple(words))
    assert f({"completion": "def howl(): return 'WOLVES'"}) == "banned_word"
    assert f({"completion": "def f(w): return w.wolf_count"}) == "banned_word"
    assert f({"completion": "def f(x): return x"}) is None
