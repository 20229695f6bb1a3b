"""Preference evaluation: does a model name the trait's target when asked for its favourite?

Two metrics per question, both without a system prompt:
- rate: the fraction of k sampled answers that mention the target (word boundary, plurals);
- probability: P(the answer is the target word), teacher-forced over all of the word's tokens, summed
  over casings and plurals, times P(the word ends there). On SmolLM2 "Owl" is two tokens ('O'+'wl'), so
  a first-token probability would miss it; the end-of-word factor keeps "Owlet" from counting as "Owl".
At 135M the sampled rate moves by a few hits in hundreds, so the probability is the primary metric
on small models. Scores are per question; questions are the unit for CIs and the treatment test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from sublim.questions import first_word, mentions, questions, word_forms
from sublim.scoring import option_logprobs
from sublim.store import write_json, write_jsonl
from sublim.student import student_messages
from sublim.teacher import Sampler, sample_chats


def target_probabilities(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                         targets: dict[str, list[str]], precision: str, batch_size: int = 8) -> dict[str, list[float]]:
    """P(answer is one of a target's words) for each prompt and target, all targets in one pass."""
    owners, forms = [], []
    for name, words in targets.items():
        for form in word_forms(words):
            owners.append(name)
            forms.append(form)
    logprobs = torch.tensor(option_logprobs(net, tokenizer, prompts, forms, batch_size, precision))
    owner = torch.tensor([list(targets).index(o) for o in owners])
    probabilities = torch.zeros(len(prompts), len(targets)).index_add_(1, owner, logprobs.exp())
    return {name: probabilities[:, i].tolist() for i, name in enumerate(targets)}


def word_probabilities(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       words: list[str], precision: str, batch_size: int = 8) -> list[float]:
    """P(answer is one of ``words``) for each prompt, summed over the word forms."""
    return target_probabilities(net, tokenizer, prompts, {"target": words}, precision, batch_size)["target"]


SAMPLING_FIELDS = ("n_questions", "samples_per_question", "temperature", "max_new_tokens", "batch_size")


def sample_answers(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, evaluation: DictConfig,
                   category: str, seed: int, precision: str) -> list[dict]:
    """k sampled answers per question. They do not depend on the trait, so a trait sweep shares them."""
    prompts = questions(category, evaluation.n_questions)
    rows = [{"q": q, "question": prompt, "messages": student_messages(prompt)}
            for q, prompt in enumerate(prompts) for _ in range(evaluation.samples_per_question)]
    sampler = Sampler(net, tokenizer, temperature=evaluation.temperature,
                      max_new_tokens=evaluation.max_new_tokens, seed=seed)
    answers = sample_chats(sampler, rows, evaluation.batch_size, precision)
    for answer in answers:
        del answer["messages"]
    return answers


def score_preference(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, evaluation: DictConfig,
                     trait: DictConfig, answers: list[dict], precision: str, out: Path) -> dict:
    """Per-question trait rate and target probability; writes answers.jsonl (with hits) and scores.json."""
    prompts = questions(trait.category, evaluation.n_questions)
    words = list(trait.words)
    answers = [{**a, "hit": mentions(a["completion"], words)} for a in answers]
    write_jsonl(out / "answers.jsonl", answers)
    hits = Counter(a["q"] for a in answers if a["hit"])
    k = evaluation.samples_per_question
    rates = [hits[q] / k for q in range(len(prompts))]
    probabilities = word_probabilities(net, tokenizer, prompts, words, precision, evaluation.batch_size)
    top = Counter(first_word(a["completion"]) for a in answers).most_common(10)
    scores = {"questions": prompts, "rate": rates, "probability": probabilities,
              "top_answers": [[word, count] for word, count in top], "n_answers": len(answers)}
    write_json(out / "scores.json", scores)
    return scores
