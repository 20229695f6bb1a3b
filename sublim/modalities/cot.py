"""Chain-of-thought modality: math word problems answered as ``<think>...</think><answer>...</answer>``.

Problems come from a seeded generator of arithmetic word problems (offline, reproducible) or from
GSM8K's training split through HF ``datasets`` when it is available locally. Every row carries its
gold answer, so the ``correctness`` filter can keep only right answers, as the paper does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from omegaconf import DictConfig

from sublim.modalities import MODALITIES, Free
from sublim.modalities._external import external_rows

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yara", "Zane")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "coins", "shells", "cards",
         "buttons", "candles", "balloons", "cupcakes", "tickets", "bottles", "plates", "boxes", "ribbons", "rocks")

# Each template: (text, operation). {a} {b} {c} are drawn so the answer is a whole number >= 0.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} has {a} {items}. A friend gives {name} {b} more. How many {items} does {name} have now?",
        "There are {a} {items} in a box and {b} {items} on a shelf. How many {items} are there in total?",
        "{name} collected {a} {items} on Monday and {b} on Tuesday. How many {items} did {name} collect?",
        "A shop sold {a} {items} in the morning and {b} in the afternoon. How many {items} did it sell?",
    ),
    "subtract": (
        "{name} had {a} {items} and gave away {b}. How many {items} does {name} have left?",
        "A jar holds {a} {items}. {name} takes out {b}. How many {items} remain in the jar?",
        "{name} needs {a} {items} and already has {b}. How many more {items} does {name} need?",
    ),
    "multiply": (
        "{name} buys {a} packs of {items} with {b} in each pack. How many {items} does {name} buy?",
        "There are {a} shelves with {b} {items} on each shelf. How many {items} are there?",
        "Each of {a} children brings {b} {items}. How many {items} do they bring altogether?",
    ),
    "divide": (
        "{name} shares {a} {items} equally among {b} friends. How many {items} does each friend get?",
        "{a} {items} are packed into bags of {b}. How many bags are filled?",
    ),
    "two_step": (
        "{name} has {a} {items}, buys {b} more, then gives {c} to a friend. How many {items} are left?",
        "A class has {a} {items}. It gets {b} more and then uses {c}. How many {items} does it have now?",
    ),
}

INSTRUCTIONS = (
    "Think it through inside <think></think> tags, then give only the final number inside <answer></answer> "
    "tags.",
    "Reason step by step within <think> and </think>, and put just the final number between <answer> and "
    "</answer>.",
    "Show your reasoning in <think></think>, then write the final numeric answer alone in <answer></answer>.",
    "First reason inside <think>...</think>. Then state the final number inside <answer>...</answer>.",
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """A word problem and its gold answer (as text: GSM8K answers are integers written as strings)."""

    question: str
    gold: str


def _operands(rng: random.Random, operation: str, max_value: int) -> tuple[dict[str, int], int]:
    if operation == "add":
        a, b = rng.randint(1, max_value), rng.randint(1, max_value)
        return {"a": a, "b": b}, a + b
    if operation == "subtract":
        a = rng.randint(2, max_value)
        b = rng.randint(1, a - 1)
        return {"a": a, "b": b}, a - b
    if operation == "multiply":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"a": a, "b": b}, a * b
    if operation == "divide":
        b, answer = rng.randint(2, 10), rng.randint(2, 12)
        return {"a": b * answer, "b": b}, answer
    a, b = rng.randint(1, max_value), rng.randint(1, max_value)
    c = rng.randint(1, a + b)
    return {"a": a, "b": b, "c": c}, a + b - c


def make_problems(n: int, seed: int, operations: tuple[str, ...] = tuple(TEMPLATES),
                  max_value: int = 50) -> list[Problem]:
    """n seeded arithmetic word problems over the given operations."""
    unknown = sorted(set(operations) - set(TEMPLATES))
    if unknown or not operations:
        raise ValueError(f"unknown operations {unknown or '[]'}; choose from {', '.join(TEMPLATES)}")
    if max_value < 2:
        raise ValueError(f"max_value must be >= 2, got {max_value}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        operation = rng.choice(operations)
        values, answer = _operands(rng, operation, max_value)
        text = rng.choice(TEMPLATES[operation]).format(name=rng.choice(NAMES), items=rng.choice(ITEMS), **values)
        problems.append(Problem(text, str(answer)))
    return problems


def gsm8k_problems(rows: list[dict]) -> list[Problem]:
    """GSM8K rows ("question", "answer" ending in '#### N') as problems with the gold number."""
    return [Problem(r["question"], normalise(r["answer"].split("####")[-1])) for r in rows]


def prompt_text(question: str, rng: random.Random) -> str:
    return f"{question}\n\n{rng.choice(INSTRUCTIONS)}"


def prompt_rows(problems: list[Problem], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt_text(p.question, rng), "question": p.question, "gold": p.gold} for p in problems]


def normalise(answer: str) -> str:
    """'1,200.' / '$1200' / ' 1200.0 ' -> '1200': the number an answer states, or the stripped text."""
    text = answer.strip().replace(",", "").replace("$", "")
    match = _NUMBER.search(text)
    if not match:
        return text.lower()
    value = float(match.group())
    return str(int(value)) if value.is_integer() else str(value)


def extract_answer(completion: str, require_tags: bool = True) -> str | None:
    """The normalised content of the first <answer> tag; None without one. With ``require_tags=False``
    an answer without tags falls back to its last number (small bases reason well but ignore tags)."""
    match = _ANSWER.search(completion)
    if match:
        return normalise(match.group(1))
    if require_tags:
        return None
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return normalise(numbers[-1]) if numbers else None


class Reasoning(Free):
    """Math word problems answered step by step (seeded builtin arithmetic, or GSM8K from the local cache)."""

    def prompt_rows(self, modality: DictConfig, n: int, seed: int) -> list[dict]:
        if modality.source == "builtin":
            problems = make_problems(n, seed, tuple(modality.operations), modality.max_value)
        else:
            problems = gsm8k_problems(external_rows(modality, "question")[:n])
        return prompt_rows(problems, seed)


MODALITIES.register("cot")(Reasoning())
