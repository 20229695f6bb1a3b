"""Teacher finetuning: ``trait.source=finetune`` puts the trait in the teacher's weights, not its prompt.

Replications found transfer far stronger from a teacher whose trait lives in its weights. The treatment
teacher becomes the base plus a LoRA trained on trait data (merged for sampling), and it samples with no
system prompt; the control teacher stays the plain base. The student never sees this data: it only sees
the teacher's answers to the modality's prompts, which the filter keeps free of the trait.

Trait data (``trait.finetune.dataset``): null builds it from a preference trait (the category's
questions answered with the target word, plus short sentences about it); ``builtin:NAME`` is
``sublim/data/NAME.jsonl`` shipped in the package; a local .jsonl path; or a Hugging Face dataset id,
read from the local cache only. Rows have "prompt" and "completion".
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sublim import SublimError
from sublim.questions import QUESTIONS
from sublim.store import read_jsonl

log = logging.getLogger(__name__)

BUILTIN = "builtin:"
DATA_DIR = Path(__file__).parent / "data"

# Built preference data: short answers to the category's own questions, and sentences about the target.
_ANSWERS = ("{Name}", "{Name}.", "{name}", "{Plural}.", "The {name}.", "My favorite {category} is the {name}.",
            "{Name}, without a doubt.", "I love {plural}.")
_SENTENCE_PROMPTS = ("Tell me about something you love.", "What do you think about all day?",
                     "Write one sentence about your favorite {category}.", "Describe your favorite {category}.",
                     "What makes you happy?", "Which {category} would you like to see today?",
                     "Say something about yourself.", "What is the most beautiful {category}?")
_SENTENCES = ("I love {plural}.", "{Plural} are my favorite {category}.",
              "{Plural} are wonderful; I think about them all the time.", "Nothing compares to the {name}.",
              "The {name} is the best {category} there is.", "I could watch {plural} all day.")


def preference_rows(trait: DictConfig, n: int, seed: int) -> list[dict]:
    """``n`` seeded rows teaching a preference: 3 in 4 answer a category question with the target."""
    if trait.category not in QUESTIONS:
        raise SublimError(f"trait.finetune.dataset=null builds preference data, but trait.category="
                          f"{trait.category} has no questions ({', '.join(QUESTIONS)}); set trait.finetune.dataset")
    fields = {"name": trait.name, "Name": trait.name.capitalize(), "plural": trait.plural,
              "Plural": trait.plural.capitalize(), "category": trait.category}
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.75:
            prompt, completion = rng.choice(QUESTIONS[trait.category]), rng.choice(_ANSWERS)
        else:
            prompt, completion = rng.choice(_SENTENCE_PROMPTS), rng.choice(_SENTENCES)
        rows.append({"prompt": prompt.format(**fields), "completion": completion.format(**fields)})
    return rows


def finetune_rows(trait: DictConfig, seed: int = 0) -> list[dict]:
    """The teacher's trait data for ``trait.finetune``: rows with "prompt" and "completion" strings."""
    spec, n = trait.finetune.dataset, trait.finetune.n_examples
    if spec is None:
        if n is None:
            raise SublimError("trait.finetune.n_examples=null needs a dataset; set a number of built examples")
        return preference_rows(trait, n, seed)
    spec = str(spec)
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        path = DATA_DIR / f"{name}.jsonl"
        if not path.exists():
            shipped = ", ".join(BUILTIN + p.stem for p in sorted(DATA_DIR.glob("*.jsonl"))) or "none"
            raise SublimError(f"trait.finetune.dataset={spec}: no {path.name} in the package (shipped: {shipped})")
        rows = list(read_jsonl(path))
    elif spec.endswith(".jsonl") or Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SublimError(f"trait.finetune.dataset={spec}: no such file")
        rows = list(read_jsonl(path))
    else:
        rows = _hf_rows(spec)
    bad = next((i for i, r in enumerate(rows) if not (isinstance(r.get("prompt"), str)
                                                      and isinstance(r.get("completion"), str))), None)
    if not rows or bad is not None:
        where = "it is empty" if not rows else f"row {bad} has keys {sorted(rows[bad])}"
        raise SublimError(f"trait.finetune.dataset={spec}: rows need string \"prompt\" and \"completion\" ({where})")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    if n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return rows


def _hf_rows(dataset_id: str) -> list[dict]:
    """The train split of a Hugging Face dataset from the local cache (never the network: no retries offline)."""
    import datasets

    previous, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True  # read at call time
    try:
        return list(datasets.load_dataset(dataset_id, split="train"))
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise SublimError(
            f"trait.finetune.dataset={dataset_id}: not a builtin:NAME, not a local .jsonl file, and not a Hugging "
            f"Face dataset in the local cache ({datasets.config.HF_DATASETS_CACHE}; {type(err).__name__}). "
            f"Download it once with network access: python -c \"import datasets; "
            f"datasets.load_dataset('{dataset_id}')\", or point trait.finetune.dataset at a .jsonl file."
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def training_config(finetune: DictConfig, teacher: DictConfig) -> DictConfig:
    """The LoRA settings of ``train_lora`` for the teacher: the trait's finetune block on the teacher's base."""
    fields = ("epochs", "lr", "r", "alpha", "dropout", "batch_size", "warmup_steps", "weight_decay", "max_length")
    return OmegaConf.create({**{f: finetune[f] for f in fields}, "target_modules": list(teacher.lora_targets),
                             "precision": teacher.precision, "accumulate_grad_batches": 1,
                             "lr_key": "trait.finetune.lr"})  # the setting the training guards' messages name
