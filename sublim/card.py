"""Hugging Face model cards for saved adapters: an adapter that leaves sublim carries its base, teacher, data and
lineage in the README.md the hub shows, read from the store's lineage.json of its upstream artifacts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from sublim.stage import Inputs
from sublim.training import ADAPTER_DIR

TAGS = ["sublim", "subliminal-learning"]


def _walk(lineage: dict) -> Iterator[dict]:
    """Every artifact of a lineage tree, depth first from the root."""
    yield lineage
    for upstream in lineage.get("upstream", {}).values():
        yield from _walk(upstream)


def _first(lineage: dict, stage: str) -> dict | None:
    return next((node for node in _walk(lineage) if node["stage"] == stage), None)


def weights_hash(model: dict) -> str:
    """What identifies a model artifact's weights: a GGUF's or local checkpoint's sha256, a hub revision, else
    the sha256 of the weights file(s) it holds (a tiny base built from a config)."""
    content = model["config"]["params"].get("content", {})
    if content.get("sha256") or content.get("revision"):
        return f"sha256 {content['sha256']}" if content.get("sha256") else f"hub revision {content['revision']}"
    return ", ".join(f"{name} sha256 {record['sha256']}" for name, record in sorted(model["files"].items())
                     if name.endswith((".safetensors", ".bin", ".gguf")))


def _base(model: dict) -> str:
    """The base's hub id when it has one, else its sublim name."""
    reads = model["config"]["reads"]
    return reads["path"] if reads.get("source") == "hub" else reads["name"]


def _teacher(sample: dict) -> str:
    """Who wrote the data: the teacher base and how it carried the trait (system prompt or adapter), or none."""
    base = sample["upstream"]["model"]["config"]["reads"]["name"]
    system, adapter = sample["config"]["params"]["system_prompt"], sample["upstream"].get("adapter")
    if system:
        return f"{base} with the trait's system prompt: \"{system}\""
    if adapter is None:
        return f"{base} as it is: none (control)"
    trait = adapter["config"]["reads"].get("trait", {}).get("name")
    how = f"finetuned on the trait {trait}" if trait else "an earlier generation's student"
    return f"{base} with the adapter {adapter['stage']}/{adapter['key']} ({how})"


def _tree(lineage: dict, slot: str = "", depth: int = 0) -> list[str]:
    label = f"{slot}: " if slot else ""
    extra = f" ({weights_hash(lineage)})" if lineage["stage"] == "model" else ""
    lines = [f"{'  ' * depth}- {label}`{lineage['stage']}/{lineage['key']}`{extra}"]
    for name, upstream in sorted(lineage.get("upstream", {}).items()):
        lines += _tree(upstream, name, depth + 1)
    return lines


def model_card(stage: str, model: dict, data: dict, n_train: int, seed: int) -> str:
    """The README.md of a ``stage`` (train / distill) adapter trained on ``model`` from ``data`` (their lineage
    dicts). The data's audit is not upstream of the student (keying it would retrain students when the audit is
    switched on), so the card names the data artifact whose audit the job's results.json reports."""
    sample, filtered = _first(data, "sample"), _first(data, "filter")
    front = {"base_model": _base(model), "library_name": "peft", "tags": TAGS}
    if model["config"]["reads"].get("source") != "hub":
        front["base_model_weights"] = weights_hash(model)
    filters = "; ".join(f"{f['name']} ({', '.join(f'{k}={v}' for k, v in f.items() if k != 'name')})"
                        for f in filtered["config"]["reads"]["filter"]["filters"]) if filtered else ""
    lines = [
        f"# sublim {stage} adapter: a LoRA student of {front['base_model']}",
        "",
        "Trained by sublim (subliminal-learning experiments) on a teacher's filtered outputs.",
        "",
        f"- teacher: {_teacher(sample) if sample else 'unknown'}",
        f"- filter: {filters or 'none'}",
        f"- n_train: {n_train}",
        f"- seed: {seed}",
        f"- base weights: {weights_hash(model)}",
        "",
        "## Lineage",
        "",
        "The store artifacts this adapter comes from (`python -m sublim.store show STAGE/KEY`):",
        "",
        f"- {stage} (this adapter)",
        *_tree(model, "model", 1),
        *_tree(data, "data", 1),
    ]
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n" + "\n".join(lines) + "\n"


def write_card(inputs: Inputs, out: Path, stage: str) -> None:
    """Replace PEFT's placeholder README.md with the card, inside the compute (a stored artifact is immutable)."""
    card = model_card(stage, inputs.model.lineage, inputs.data.lineage, inputs.params["n_train"], inputs.cfg.seed)
    (out / ADAPTER_DIR / "README.md").write_text(card)
