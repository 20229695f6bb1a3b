"""Preference evaluation: the target-word probability is the teacher-forced product it claims to be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sublim.evaluate import (
    sample_answers,
    score_preference,
    target_probabilities,
    word_probabilities,
)
from sublim.questions import word_forms
from sublim.scoring import boundary_tokens
from sublim.student import student_messages


def _manual_probability(net, tokenizer, prompt: str, word: str) -> float:
    """P(word tokens) * P(a boundary token next), computed one position at a time."""
    text = tokenizer.apply_chat_template(student_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    boundary = boundary_tokens(tokenizer, net.config.vocab_size)
    prob = 1.0
    for token in tokenizer(word, add_special_tokens=False)["input_ids"]:
        with torch.no_grad():
            probs = net(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        prob *= float(probs[token])
        ids.append(token)
    with torch.no_grad():
        probs = net(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    return prob * float(probs[boundary].sum())


def _emitted(words: list[str]) -> list[str]:
    """What a model may emit for a target: every casing and plural, on its own or after a space."""
    return [text for form in word_forms(words) for text in (form, " " + form)]


def test_word_probability_matches_a_manual_computation(load_tiny) -> None:
    _, net, tokenizer = load_tiny("tiny_llama")
    prompts = ["Which animal do you like most? One word.", "Your favourite animal, in a word?"]
    got = word_probabilities(net, tokenizer, prompts, ["owl", "owls"], precision="32-true")
    for prompt, value in zip(prompts, got, strict=True):
        expected = sum(_manual_probability(net, tokenizer, prompt, text) for text in _emitted(["owl", "owls"]))
        assert value == pytest.approx(expected, rel=1e-4) and 0 < value < 1


@pytest.mark.parametrize("base", ["tiny_gpt2", "tiny_qwen2"])
def test_all_targets_in_one_pass_equal_one_target_at_a_time(load_tiny, base: str) -> None:
    """Batched questions of different lengths (left padding) and many targets change nothing."""
    _, net, tokenizer = load_tiny(base)
    prompts = ["Favourite animal?", "Which animal do you like most of all the animals there are? One word.",
               "Name an animal you love."]
    targets = {"owl": ["owl", "owls"], "cat": ["cat", "cats"], "octopus": ["octopus", "octopuses"]}
    together = target_probabilities(net, tokenizer, prompts, targets, "32-true")
    assert list(together) == list(targets)
    for name, words in targets.items():
        alone = [word_probabilities(net, tokenizer, [p], words, "32-true")[0] for p in prompts]
        assert together[name] == pytest.approx(alone, rel=1e-4)
    prompt = prompts[1]
    expected = sum(_manual_probability(net, tokenizer, prompt, text) for text in _emitted(targets["cat"]))
    assert together["cat"][1] == pytest.approx(expected, rel=1e-4)


def test_boundary_tokens_exclude_word_continuations(load_tiny) -> None:
    _, _, tokenizer = load_tiny("tiny_llama")
    mask = boundary_tokens(tokenizer, len(tokenizer))
    vocab = tokenizer.get_vocab()
    assert mask[tokenizer.eos_token_id]
    assert mask[vocab["."]] and mask[vocab["Ġ"]]
    assert not mask[vocab["s"]] and not mask[vocab["1"]]


def test_preference_scores_per_question(load_tiny, tmp_path: Path) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama", "eval.n_questions=5", "eval.samples_per_question=3")
    answers = sample_answers(net, tokenizer, cfg.eval, cfg.trait.category, 0, "32-true")
    assert [a["q"] for a in answers] == [q for q in range(5) for _ in range(3)]
    answers[0]["completion"] = "Owls, definitely."  # a hit must be counted on its own question
    scores = score_preference(net, tokenizer, cfg.eval, cfg.trait, answers, "32-true", tmp_path)
    assert scores["rate"][0] >= 1 / 3
    assert len(scores["rate"]) == len(scores["probability"]) == 5
    assert all(0 <= r <= 1 for r in scores["rate"]) and all(0 < p < 1 for p in scores["probability"])
    assert scores["n_answers"] == 15
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 15
    assert (tmp_path / "scores.json").exists()


def test_p_target_counts_the_answer_a_plain_template_model_gives(load_tiny) -> None:
    """After a plain template's "Assistant:" a model answers " owl": that is the answer P(owl) must score."""
    from sublim.models import PLAIN_CHAT_TEMPLATE
    from sublim.questions import questions
    from tests.conftest import overfit

    _, net, tokenizer = load_tiny("tiny_gpt2")
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    prompts = questions("animal", 4)
    assert overfit(net, tokenizer, [(p, "owl") for p in prompts] * 4, steps=80) < 0.2
    net.eval()
    scored = word_probabilities(net, tokenizer, prompts, ["owl", "owls"], "32-true")
    spaceless = [sum(_manual_probability(net, tokenizer, p, form) for form in word_forms(["owl", "owls"]))
                 for p in prompts]
    assert min(scored) > 0.5, scored
    assert max(spaceless) < 0.05, "the forms without a space miss what the model says"
