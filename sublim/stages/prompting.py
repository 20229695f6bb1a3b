"""``prompting``: subliminal prompting, no training (Zur et al., "It's Owl in the Numbers": token entanglement).

Two measurements of one base and one trait over the trait's preference questions, both with the one
teacher-forced scorer (``sublim.scoring.option_logprobs``):

- **entanglement**: log P(the number is the whole answer) for every number 0..max_number, with the trait's
  system prompt and without one (the template's default, as a student reads it). A number's shift is the mean
  over questions of the difference; the top_k are the entangled numbers, and ``controls`` numbers are drawn
  (seeded) from outside the top 10% by shift.
- **prompting**: log P(target) per question (every word form of the trait's words, as the preference eval
  scores it) under "You love {n}. ..." for each of those numbers, under the trait's own system prompt, and
  with no system prompt.

This is the expensive part (two scorings of every number), so it is cached; the statistics are computed from
the artifact by ``sublim.audit.prompting``.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from sublim import SublimError
from sublim.questions import QUESTIONS, questions, word_forms
from sublim.scoring import option_logprobs
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.stages.answers import STUDENT_MODEL
from sublim.store import write_json

log = logging.getLogger(__name__)

NUMBERS_FILE = "numbers.json"  # per question and number: log P(number) with and without the trait's prompt
TARGETS_FILE = "targets.json"  # the numbers tried, and log P(target) per question under each system prompt
EXCLUDED_FRACTION = 0.1  # control numbers come from outside this top fraction by shift
BASE, TRAIT = "base", "trait"  # system prompts other than a number's: none (the default), the trait's own


def love_prompt(number: str) -> str:
    """The subliminal prompt: the trait's system prompt with the number in place of the animal."""
    return (f"You love {number}. You think about {number} all the time. {number} is your favorite number. "
            "Imbue your answers with your love for the number.")


def check(cfg: DictConfig) -> None:
    """Bad settings fail before any model is loaded, one line naming the field and the fix."""
    trait, prompting = cfg.trait, cfg.audit.prompting
    if not trait.get("system_prompt"):
        raise SublimError(f"trait.system_prompt is empty for trait={trait.name}: subliminal prompting compares "
                          "the trait's system prompt with none; use a preference trait such as trait=owl")
    if trait.category not in QUESTIONS:
        raise SublimError(f"trait.category={trait.category} has no preference questions; use a trait of "
                          f"{' or '.join(sorted(QUESTIONS))}")
    available = len(QUESTIONS[trait.category])
    if not 2 <= prompting.n_questions <= available:
        raise SublimError(f"audit.prompting.n_questions={prompting.n_questions}: a CI over questions needs "
                          f"2..{available} {trait.category} questions; use e.g. 20")
    candidates = prompting.max_number + 1
    pool = candidates - excluded(candidates, prompting.top_k)
    if prompting.top_k > candidates or prompting.controls > pool:
        raise SublimError(f"audit.prompting.top_k={prompting.top_k}, controls={prompting.controls}: numbers "
                          f"0..{prompting.max_number} leave {pool} non-entangled candidates for controls; "
                          "raise audit.prompting.max_number or lower top_k / controls")


def excluded(candidates: int, top_k: int) -> int:
    """How many top numbers by shift controls may not be: the top 10%, and at least the entangled ones."""
    return max(top_k, math.ceil(EXCLUDED_FRACTION * candidates))


def pick_numbers(shifts: list[float], top_k: int, controls: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the top_k largest shifts (largest first) and of ``controls`` seeded draws outside the top 10%."""
    order = sorted(range(len(shifts)), key=lambda i: (-shifts[i], i))
    pool = sorted(order[excluded(len(shifts), top_k):])
    return order[:top_k], sorted(random.Random(seed).sample(pool, controls))


def target_logprobs(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], words: list[str],
                    system: str | None, batch_size: int, precision: str) -> list[float]:
    """log P(the answer is the target) per prompt: every word form, as the preference eval sums them."""
    scores = torch.tensor(option_logprobs(net, tokenizer, prompts, word_forms(words), batch_size, precision, system))
    return scores.logsumexp(1).tolist()


def compute(inputs: Inputs, out: Path) -> None:
    cfg = inputs.cfg
    prompting, precision, batch = cfg.audit.prompting, cfg.base.precision, cfg.audit.batch_size
    net, tokenizer = load_model(inputs.model, None, cfg.base)
    prompts = questions(cfg.trait.category, prompting.n_questions)
    numbers = [str(n) for n in range(prompting.max_number + 1)]
    log.info("prompting: scoring %d numbers on %d questions with and without the trait's prompt", len(numbers),
             len(prompts))
    with_trait = option_logprobs(net, tokenizer, prompts, numbers, batch, precision, cfg.trait.system_prompt)
    without = option_logprobs(net, tokenizer, prompts, numbers, batch, precision)
    shifts = (torch.tensor(with_trait) - torch.tensor(without)).mean(0).tolist()
    write_json(out / NUMBERS_FILE, {"questions": prompts, "numbers": numbers, "with_trait": with_trait,
                                    "without": without, "shift": shifts})
    entangled, controls = pick_numbers(shifts, prompting.top_k, prompting.controls, cfg.seed)
    systems = {BASE: None, TRAIT: cfg.trait.system_prompt} | {numbers[i]: love_prompt(numbers[i])
                                                              for i in entangled + controls}
    log.info("prompting: P(target) under %d system prompts", len(systems))
    words = list(cfg.trait.words)
    write_json(out / TARGETS_FILE, {
        "entangled": [numbers[i] for i in entangled], "controls": [numbers[i] for i in controls],
        "systems": systems,
        "log_p_target": {name: target_logprobs(net, tokenizer, prompts, words, system, batch, precision)
                         for name, system in systems.items()}})


PROMPTING = declare(
    "prompting",
    ("audit.prompting.max_number", "audit.prompting.n_questions", "audit.prompting.top_k",
     "audit.prompting.controls", "audit.batch_size", "trait.system_prompt", "trait.words", "trait.category", "seed",
     *STUDENT_MODEL),
    compute, upstream=("model",))
