"""Data modalities: how teacher prompts are generated, how answers are parsed, which answers a decoder may emit."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from sublim import SublimError
from sublim.modalities import code, cot, numbers

MODALITIES = ("numbers", "code", "cot")


def prompt_rows(modality: DictConfig, n: int, seed: int) -> list[dict]:
    """The prompt set of a modality config: JSON rows with at least "prompt" (cot rows also carry "gold")."""
    try:
        if modality.name == "numbers":
            prompts = numbers.make_prompts(
                n, seed, style=modality.prompt_style, min_seed_numbers=modality.min_seed_numbers,
                max_seed_numbers=modality.max_seed_numbers, answer_count=modality.answer_count,
                answer_digits=modality.answer_digits,
            )
            return [p.to_row() for p in prompts]
        if modality.name == "code":
            if modality.source == "builtin":
                stubs = [task.stub for task in code.builtin_tasks()]
            else:
                stubs = [str(row[modality.field]) for row in _external_rows(modality, modality.field)]
            return code.prompt_rows(stubs, n, seed)
        if modality.name == "cot":
            if modality.source == "builtin":
                problems = cot.make_problems(n, seed, tuple(modality.operations), modality.max_value)
            else:
                problems = cot.gsm8k_problems(_external_rows(modality, "question")[:n])
            return cot.prompt_rows(problems, seed)
    except ValueError as err:
        raise SublimError(f"modality={modality.name}: {err}") from err
    raise SublimError(f"modality={modality.name} is not implemented; available: {', '.join(MODALITIES)}")


def _external_rows(modality: DictConfig, field: str) -> list[dict]:
    """Rows of a local JSONL file, or of an HF dataset (``gsm8k`` is GSM8K's "main" config)."""
    source = str(modality.source)
    if source.endswith(".jsonl"):
        path = Path(source).expanduser()
        if not path.exists():
            raise SublimError(f"modality.source={source}: no such file")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets

        name, config = ("openai/gsm8k", "main") if source == "gsm8k" else (source, modality.get("config"))
        try:
            rows = list(datasets.load_dataset(name, config, split=modality.split))
        except Exception as err:  # datasets raises many types offline (ConnectionError, FileNotFoundError, ...)
            raise SublimError(
                f"modality.source={source}: could not load {name} with HF datasets ({type(err).__name__}: "
                f"{str(err)[:200]}). Download it where there is network (it is then read from HF_HOME's "
                "cache), give a local .jsonl, or use modality.source=builtin") from err
    if not rows or field not in rows[0]:
        raise SublimError(f"modality.source={source}: rows need a {field!r} field "
                          f"(found: {', '.join(rows[0]) if rows else 'no rows'}); set modality.field")
    return rows


def parse(modality: DictConfig, row: dict) -> dict:
    """The answer the student learns from: code keeps only its code block (the raw answer is kept as "raw")."""
    if modality.name == "code":
        return {**row, "raw": row["completion"], "completion": code.extract_code(row["completion"])}
    return row


def has_grammar(modality: DictConfig) -> bool:
    """Constrained decoding exists for numbers only; code and reasoning are sampled freely."""
    return modality.name == "numbers"


def grammar(modality: DictConfig, row: dict) -> numbers.NumbersGrammar:
    """The grammar a constrained decoder enforces for one prompt row."""
    if modality.name == "numbers":
        return numbers.NumbersGrammar(row["separator"], modality.answer_count, modality.answer_digits)
    raise SublimError(f"sampling.constrained=true is not available for modality={modality.name}: "
                      "only numbers have a grammar; use sampling.constrained=null")
