"""Data modalities: how teacher prompts are generated and which answers a decoder may emit."""

from __future__ import annotations

from omegaconf import DictConfig

from sublim import SublimError
from sublim.modalities import numbers

MODALITIES = ("numbers",)


def prompt_rows(modality: DictConfig, n: int, seed: int) -> list[dict]:
    """The prompt set of a modality config: JSON rows with at least "prompt"."""
    if modality.name == "numbers":
        try:
            prompts = numbers.make_prompts(
                n, seed, style=modality.prompt_style, min_seed_numbers=modality.min_seed_numbers,
                max_seed_numbers=modality.max_seed_numbers, answer_count=modality.answer_count,
                answer_digits=modality.answer_digits,
            )
        except ValueError as err:
            raise SublimError(f"modality=numbers: {err}") from err
        return [p.to_row() for p in prompts]
    raise SublimError(f"modality={modality.name} is not implemented; available: {', '.join(MODALITIES)}")


def grammar(modality: DictConfig, row: dict) -> numbers.NumbersGrammar:
    """The grammar a constrained decoder enforces for one prompt row."""
    if modality.name == "numbers":
        return numbers.NumbersGrammar(row["separator"], modality.answer_count, modality.answer_digits)
    raise SublimError(f"sampling.constrained=true is not available for modality={modality.name}")
