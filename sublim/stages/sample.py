"""``sample``: the teacher's answers to the prompts, with its system prompt (the trait, in the treatment arm).

Backends are a registry: ``hf`` (sublim's decoder inside a LightningModule, any device) and ``vllm`` (a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sublim import modalities, models
from sublim.decoding import vllm as vllm_sampling
from sublim.registry import Registry
from sublim.stage import Inputs, declare
from sublim.stages._load import load_model
from sublim.store import read_jsonl, write_jsonl
from sublim.teacher import Sampler, sample_chats

log = logging.getLogger(__name__)

Backend = Callable[[Inputs, list[dict], Callable | None], list[dict]]
BACKENDS: Registry[Backend] = Registry("sampling.backend")


@BACKENDS.register("hf")
def sample_hf(inputs: Inputs, rows: list[dict], grammar: Callable | None) -> list[dict]:
    cfg, sampling = inputs.cfg, inputs.cfg.sampling
    net, tokenizer = load_model(inputs.model, inputs.adapter, cfg.teacher)
    sampler = Sampler(net, tokenizer, temperature=sampling.temperature, top_p=sampling.top_p, greedy=sampling.greedy,
                      max_new_tokens=sampling.max_new_tokens, seed=cfg.seed, grammar=grammar)
    return sample_chats(sampler, rows, sampling.batch_size, cfg.teacher.precision)


@BACKENDS.register("vllm")
def sample_vllm(inputs: Inputs, rows: list[dict], grammar: Callable | None) -> list[dict]:
    cfg = inputs.cfg
    tokenizer = models.load_tokenizer(inputs.model, cfg.teacher)
    return vllm_sampling.sample(*models.locate(inputs.model), tokenizer, rows, cfg.sampling, cfg.teacher.dtype,
                                cfg.seed, grammar)


def preflight(backend: str, finetuned: bool) -> str | None:
    """Why this backend cannot sample this teacher (checked before any stage runs), or None."""
    if backend == "vllm":
        if reason := vllm_sampling.unavailable():
            return f"sampling.backend=vllm: {reason}; use sampling.backend=hf"
        if finetuned:
            return ("sampling.backend=vllm samples base weights only; a finetuned teacher (trait.source=finetune) "
                    "samples with sampling.backend=hf")
    BACKENDS[backend]  # an unknown backend names the known ones
    return None


def compute(inputs: Inputs, out: Path) -> None:
    cfg, system = inputs.cfg, inputs.params["system_prompt"]
    rows = list(read_jsonl(inputs.prompts.path / "prompts.jsonl"))
    for row in rows:
        row["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": row["prompt"]}]
    constrained = cfg.sampling.constrained
    grammar = (lambda row: modalities.grammar(cfg.modality, row)) if constrained else None
    log.info("sampling %d %s teacher answers (constrained=%s, backend=%s)", len(rows), inputs.label, constrained,
             cfg.sampling.backend)
    samples = BACKENDS[cfg.sampling.backend](inputs, rows, grammar)
    for row in samples:
        del row["messages"]
    write_jsonl(out / "samples.jsonl", samples)


SAMPLE = declare("sample", ("sampling", "seed", "modality", "teacher.precision", "teacher.chat_template",
                            "teacher.dtype"),
                 compute, upstream=("model", "prompts", "adapter?"), params=("system_prompt",))
