"""A dataset sublim did not make, as a store artifact, so that audits of it are cached like every stage.

Rows come from a local ``.jsonl`` file or from a Hugging Face dataset in the local cache (never the network: an
offline machine fails in a second, not after minutes of retries), with the prompt and the answer under
``audit.prompt_field`` / ``audit.completion_field``. They are imported as a ``dataset`` artifact keyed by the
rows' content, so the same rows audited from anywhere reuse the same passes.

The answers are text, tokenised by the teacher's tokenizer (ids another model emitted are not kept: their
vocabulary is unknown). ``separator`` (the numbers grammar of constrained data) and ``finished`` (a sample cut
by its length limit has no end of turn to score) are kept when present.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sublim import SublimError
from sublim.store import Artifact, Store, content_hash, read_jsonl, write_jsonl

DATA_FILE = "kept.jsonl"  # the name the logprobs stage reads, as in a filter artifact
KEPT_FIELDS = ("separator", "finished")


def load_rows(audit: DictConfig) -> list[dict]:
    """The rows of ``audit.dataset`` as prompt/completion dicts; a bad dataset is one error line naming the fix."""
    spec = str(audit.dataset)
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise SublimError(f"audit.dataset={spec}: no such file; give a .jsonl of prompt/completion rows or "
                              "the id of a Hugging Face dataset in the local cache")
        if not path.is_file() or path.suffix != ".jsonl":
            raise SublimError(f"audit.dataset={spec} is not a .jsonl file; give a JSON-lines file with one "
                              f"{{\"{audit.prompt_field}\": ..., \"{audit.completion_field}\": ...}} object a line")
        rows = list(read_jsonl(path))
    else:
        rows = _hf_rows(spec, audit.split)
    return _checked(rows, spec, audit.prompt_field, audit.completion_field)


def _hf_rows(dataset_id: str, split: str) -> list[dict]:
    """One split of a Hugging Face dataset from the local cache."""
    import datasets

    previous, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True  # read at call time
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise SublimError(
            f"audit.dataset={dataset_id}: not a local file and not a Hugging Face dataset (split {split}) in the "
            f"local cache ({type(err).__name__}); download it once where there is network: python -c \"import "
            f"datasets; datasets.load_dataset('{dataset_id}')\", or give a .jsonl file") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _checked(rows: list, spec: str, prompt: str, completion: str) -> list[dict]:
    if not rows:
        raise SublimError(f"audit.dataset={spec} has no rows; give a dataset with at least one prompt/completion row")
    out = []
    for i, row in enumerate(rows):
        for field, setting in ((prompt, "prompt_field"), (completion, "completion_field")):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise SublimError(f"audit.dataset={spec}: row {i} has no string {field!r} (it has: {found}); "
                                  f"set audit.{setting} to the field that holds it")
        out.append({"prompt": row[prompt], "completion": row[completion]}
                   | {k: row[k] for k in KEPT_FIELDS if k in row})
    return out


def import_rows(store: Store, rows: list[dict]) -> Artifact:
    """The rows as a ``dataset`` artifact keyed by their content (where they came from does not matter)."""
    return store.get_or_compute("dataset", {"sha256": content_hash(rows, length=64)}, {},
                                lambda out: write_jsonl(out / DATA_FILE, rows))
