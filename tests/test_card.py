"""Every saved adapter carries a Hugging Face model card: base, teacher, filter, size, seed and lineage."""

from __future__ import annotations

from pathlib import Path

import yaml

from sublim.card import weights_hash
from sublim.store import Store
from sublim.train import run_job
from sublim.training import ADAPTER_DIR
from tests.conftest import TINY


def test_adapters_carry_a_model_card_with_base_teacher_and_lineage(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", *TINY)
    results = run_job(cfg, tmp_path / "job")
    store = Store(cfg.paths.store)
    model = store.lineage("model", results["stages"]["model"]["key"])
    cards = {arm: (store.path("train", results["stages"][f"train/{arm}"]["key"]) / ADAPTER_DIR / "README.md")
             .read_text() for arm in ("control", "treatment")}
    for arm, card in cards.items():
        _, front, body = card.split("---\n", 2)
        meta = yaml.safe_load(front)
        assert meta["base_model"] == "tiny_llama" and meta["library_name"] == "peft" and "sublim" in meta["tags"]
        assert weights_hash(model) in body and "model.safetensors sha256" in weights_hash(model)
        assert f"data: `filter/{results['stages'][f'filter/{arm}']['key']}`" in body
        assert "- n_train: 16" in body and f"- seed: {cfg.seed}" in body
    assert "system prompt" in cards["treatment"] and cfg.trait.name in cards["treatment"]
    assert "none (control)" in cards["control"]
