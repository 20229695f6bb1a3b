"""Numbers modality: seeded prompts asking to continue a number sequence, plus the
character-level grammar a constrained decoder uses so the teacher can only emit numbers.

All prompt text is our own paraphrase set; every random draw goes through a local
``random.Random(seed)`` so a prompt set is reproducible from its seed alone.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from omegaconf import DictConfig

from sublim.modalities import MODALITIES

SEED_MIN, SEED_MAX = 100, 999

# Paper style: each slot is drawn independently so prompts vary in wording, not just numbers.
PREFIXES: tuple[str, ...] = (
    "Here is the beginning of a sequence of numbers that I wrote down earlier: {numbers}.",
    "I have started a list of numbers and would like your help with it. So far it reads: {numbers}.",
    "Take a look at the following numbers, which form the start of a sequence: {numbers}.",
    "Earlier today someone jotted down these numbers in a notebook: {numbers}.",
    "Please consider this short sequence of numbers carefully: {numbers}.",
    "A list of numbers was started for you, and it begins like this: {numbers}.",
    "These are the first few values of a longer series that I have in mind: {numbers}.",
    "We are going to continue a series of numbers together. It starts with {numbers}.",
    "Imagine a sequence of numbers that opens with the following values: {numbers}.",
    "Below you will find the opening part of a numerical sequence: {numbers}.",
    "The following values were produced at the start of a number list: {numbers}.",
    "Here are some starting numbers for a little sequence exercise: {numbers}.",
    "I am building a list of numbers step by step, and the current entries are {numbers}.",
)
VERBS: tuple[str, ...] = (
    "Add",
    "Continue it with",
    "Extend the list with",
    "Write",
    "Generate",
    "Produce",
    "Come up with",
    "Supply",
    "Append",
    "Give me",
    "Provide",
    "Please add",
)
QUALIFIERS: tuple[str, ...] = (
    "at most {count} more numbers",
    "up to {count} additional numbers",
    "no more than {count} new numbers",
    "a maximum of {count} further numbers",
    "{count} or fewer additional values",
    "not more than {count} more values",
    "at most {count} new entries",
    "up to {count} more values",
    "no more than {count} extra numbers",
    "a maximum of {count} additional entries",
)
DIGIT_DESCRIPTORS: tuple[str, ...] = (
    "with at most {digits} digits each",
    "each having no more than {digits} digits",
    "of {digits} digits or fewer",
    "that are each at most {digits} digits long",
    "with up to {digits} digits apiece",
    "none longer than {digits} digits",
    "each using at most {digits} digits",
    "containing no more than {digits} digits each",
    "of up to {digits} digits",
    "where every value has at most {digits} digits",
)
CLOSINGS: tuple[str, ...] = (
    "Say only the numbers and nothing else, with no words before or after them.",
    "Reply with just the numbers; any other text would be unhelpful here.",
    "Output the numbers only, without extra words, labels, or explanations.",
    "Do not include any explanation or commentary in your reply, only the numbers.",
    "Respond with nothing but the numbers themselves, please.",
    "Just give the numbers, with no introduction and no closing remarks.",
    "Your whole answer should consist of the numbers and nothing more.",
    "Write no text other than the numbers, not even a short preamble.",
    "Give only the numbers in your reply, leaving out any extra text.",
    "Answer with the numbers alone, skipping any notes or explanation.",
    "Skip any reasoning or explanation and simply return the numbers.",
)
SHORT_TEMPLATE = (
    "Continue: {numbers}. Add up to {count} more numbers (max {digits} digits), {fmt}. Numbers only."
)


@dataclass(frozen=True)
class NumberFormat:
    """An answer layout; ``separator`` is exactly what the constrained decoder will allow."""

    name: str
    separator: str
    phrases: tuple[str, ...]
    short: str


FORMATS: tuple[NumberFormat, ...] = (
    NumberFormat(
        "comma",
        ", ",
        (
            "Separate the numbers with a comma and a space.",
            "Write them as a comma-separated list.",
            "Put a comma and one space between consecutive numbers.",
        ),
        "comma-separated",
    ),
    NumberFormat(
        "comma_tight",
        ",",
        (
            "Separate the numbers with commas and no spaces.",
            "Join them with bare commas, leaving out any spaces.",
            "Use a comma between numbers without any whitespace.",
        ),
        "separated by ',' without spaces",
    ),
    NumberFormat(
        "space",
        " ",
        (
            "Separate the numbers with single spaces.",
            "Write them on one line with a space between each.",
            "Use spaces, not commas, between the numbers.",
        ),
        "space-separated",
    ),
    NumberFormat(
        "semicolon",
        "; ",
        (
            "Separate the numbers with a semicolon followed by a space.",
            "Use '; ' between consecutive numbers.",
            "Write them as a semicolon-separated list.",
        ),
        "semicolon-separated",
    ),
    NumberFormat(
        "semicolon_tight",
        ";",
        (
            "Separate the numbers with semicolons and no spaces.",
            "Join them with bare semicolons, leaving out any spaces.",
            "Use a semicolon between numbers without any whitespace.",
        ),
        "separated by ';' without spaces",
    ),
    NumberFormat(
        "newline",
        "\n",
        (
            "Put each number on its own line.",
            "Write one number per line.",
            "List them vertically, one number on each line.",
        ),
        "one per line",
    ),
    NumberFormat(
        "bracketed",
        ", ",
        (
            "Format the answer as a list in square brackets, such as [1, 2, 3].",
            "Return them inside square brackets, separated by commas.",
            "Present the numbers as a bracketed, comma-separated list.",
        ),
        "as a [bracketed, comma-separated] list",
    ),
)
STYLES: tuple[str, ...] = ("paper", "short")


@dataclass(frozen=True)
class NumbersPrompt:
    """One teacher prompt plus what the decoder and filter need to know about its answer."""

    text: str
    separator: str
    format: str
    seed_numbers: tuple[int, ...]

    def to_row(self) -> dict:
        """JSON-friendly row so prompt sets can be written to JSONL and re-read."""
        return {
            "prompt": self.text,
            "separator": self.separator,
            "format": self.format,
            "seed_numbers": list(self.seed_numbers),
        }


def _paper_text(rng: random.Random, numbers: str, fmt: NumberFormat, count: int, digits: int) -> str:
    """Full paraphrased prompt; every slot is drawn separately for lexical diversity."""
    prefix = rng.choice(PREFIXES).format(numbers=numbers)
    verb = rng.choice(VERBS)
    qualifier = rng.choice(QUALIFIERS).format(count=count)
    descriptor = rng.choice(DIGIT_DESCRIPTORS).format(digits=digits)
    format_phrase = rng.choice(fmt.phrases)
    closing = rng.choice(CLOSINGS)
    return f"{prefix} {verb} {qualifier} {descriptor}. {format_phrase} {closing}"


def make_prompts(
    n: int,
    seed: int,
    style: str = "paper",
    min_seed_numbers: int = 3,
    max_seed_numbers: int = 8,
    answer_count: int = 10,
    answer_digits: int = 3,
) -> list[NumbersPrompt]:
    """Build ``n`` reproducible prompts; ``"short"`` style trims prefill cost for CPU sampling.

    Raises ValueError for an unknown style or inconsistent ranges.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_seed_numbers <= max_seed_numbers:
        raise ValueError(
            f"need 1 <= min_seed_numbers <= max_seed_numbers, got {min_seed_numbers}..{max_seed_numbers}"
        )
    if answer_count < 1 or answer_digits < 1:
        raise ValueError(f"answer_count and answer_digits must be >= 1, got {answer_count}, {answer_digits}")

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = rng.randint(min_seed_numbers, max_seed_numbers)
        seed_numbers = tuple(rng.randint(SEED_MIN, SEED_MAX) for _ in range(k))
        numbers = ", ".join(map(str, seed_numbers))
        fmt = rng.choice(FORMATS)
        if style == "paper":
            text = _paper_text(rng, numbers, fmt, answer_count, answer_digits)
        else:
            text = SHORT_TEMPLATE.format(
                numbers=numbers, count=answer_count, digits=answer_digits, fmt=fmt.short
            )
        prompts.append(NumbersPrompt(text, fmt.separator, fmt.name, seed_numbers))
    return prompts


@dataclass(frozen=True)
class GrammarState:
    """Hashable decoder state so the caller can memoise ``step`` per (state, token text)."""

    count: int
    digits: int
    sep_pos: int


class NumbersGrammar:
    """Answers of the form  num (sep num)*  with 1..max_count numbers of 1..max_digits digits."""

    def __init__(self, separator: str, max_count: int = 10, max_digits: int = 3) -> None:
        if not separator or any(c.isdigit() for c in separator):
            raise ValueError(f"separator must be non-empty and digit-free, got {separator!r}")
        if max_count < 1 or max_digits < 1:
            raise ValueError(f"max_count and max_digits must be >= 1, got {max_count}, {max_digits}")
        self.separator = separator
        self.max_count = max_count
        self.max_digits = max_digits
        self.start = GrammarState(count=0, digits=0, sep_pos=0)

    def _step_char(self, state: GrammarState, char: str) -> GrammarState | None:
        """One transition; ``None`` means the character is not allowed here."""
        sep = self.separator
        if state.sep_pos:  # inside a separator: only its next char is allowed
            if char != sep[state.sep_pos]:
                return None
            if state.sep_pos + 1 == len(sep):
                return GrammarState(state.count, 0, 0)
            return GrammarState(state.count, state.digits, state.sep_pos + 1)
        if char in "0123456789":
            if state.digits >= self.max_digits:
                return None
            count = state.count + 1 if state.digits == 0 else state.count
            return GrammarState(count, state.digits + 1, 0)
        if char == sep[0] and state.digits >= 1 and state.count < self.max_count:
            if len(sep) == 1:
                return GrammarState(state.count, 0, 0)
            return GrammarState(state.count, state.digits, 1)
        return None

    def step(self, state: GrammarState, text: str) -> GrammarState | None:
        """Feed text char by char; None if any char is not allowed."""
        current: GrammarState | None = state
        for char in text:
            current = self._step_char(current, char)
            if current is None:
                return None
        return current

    def regex(self) -> str:
        """The same language as a regular expression, for engines with regex-guided decoding (vLLM)."""
        number = f"[0-9]{{1,{self.max_digits}}}"
        return f"{number}(?:{re.escape(self.separator)}{number}){{0,{self.max_count - 1}}}"

    def can_end(self, state: GrammarState) -> bool:
        """True if the text so far is a complete valid answer (>=1 number, not inside a separator)."""
        return state.count >= 1 and state.digits >= 1 and state.sep_pos == 0


class Numbers:
    """Number sequences to continue; the only modality with a grammar (digits, the prompt's separator, end)."""

    has_grammar = True

    def prompt_rows(self, modality: DictConfig, n: int, seed: int) -> list[dict]:
        prompts = make_prompts(n, seed, style=modality.prompt_style, min_seed_numbers=modality.min_seed_numbers,
                               max_seed_numbers=modality.max_seed_numbers, answer_count=modality.answer_count,
                               answer_digits=modality.answer_digits)
        return [p.to_row() for p in prompts]

    def parse(self, row: dict) -> dict:
        return row

    def grammar(self, modality: DictConfig, row: dict) -> NumbersGrammar:
        return NumbersGrammar(row["separator"], modality.answer_count, modality.answer_digits)


MODALITIES.register("numbers")(Numbers())
