"""Prompt sources outside sublim: a local JSONL file, or a Hugging Face dataset from the local cache."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from sublim import SublimError


def external_rows(modality: DictConfig, field: str) -> list[dict]:
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
