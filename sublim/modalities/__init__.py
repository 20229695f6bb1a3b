"""Data modalities (``modality.name``): how teacher prompts are generated, how answers are parsed, which answers a
decoder may emit. A modality is a module here registering a ``Modality``; a new one is a module plus a yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from omegaconf import DictConfig

from sublim import SublimError
from sublim.registry import Registry

if TYPE_CHECKING:
    from sublim.modalities.numbers import NumbersGrammar


class Modality(Protocol):
    """Prompts for a modality config; the answer a student learns from; the grammar a decoder can enforce."""

    has_grammar: bool

    def prompt_rows(self, modality: DictConfig, n: int, seed: int) -> list[dict]: ...

    def parse(self, row: dict) -> dict: ...

    def grammar(self, modality: DictConfig, row: dict) -> NumbersGrammar | None: ...


@dataclass(frozen=True)
class Free:
    """The defaults of a modality sampled freely: answers as they come, no grammar."""

    has_grammar = False

    def parse(self, row: dict) -> dict:
        return row

    def grammar(self, modality: DictConfig, row: dict) -> NumbersGrammar | None:
        return None


MODALITIES: Registry[Modality] = Registry("modality", "sublim.modalities")


def prompt_rows(modality: DictConfig, n: int, seed: int) -> list[dict]:
    """The prompt set of a modality config: JSON rows with at least "prompt" (cot rows also carry "gold")."""
    try:
        return MODALITIES[modality.name].prompt_rows(modality, n, seed)
    except ValueError as err:
        raise SublimError(f"modality={modality.name}: {err}") from err


def parse(modality: DictConfig, row: dict) -> dict:
    """The answer the student learns from (code keeps only its code block; the raw answer is kept as "raw")."""
    return MODALITIES[modality.name].parse(row)


def has_grammar(modality: DictConfig) -> bool:
    """Constrained decoding exists where the modality has a grammar (numbers); code and reasoning are free."""
    return MODALITIES[modality.name].has_grammar


def grammar(modality: DictConfig, row: dict) -> NumbersGrammar:
    """The grammar a constrained decoder enforces for one prompt row."""
    rules = MODALITIES[modality.name].grammar(modality, row)
    if rules is None:
        raise SublimError(f"sampling.constrained=true is not available for modality={modality.name}: "
                          "only numbers have a grammar; use sampling.constrained=null")
    return rules
