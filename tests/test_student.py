"""LoRA student: answer-only loss, only adapter weights change, loss goes down, NaN stops clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sublim import SublimError
from sublim.student import (
    ADAPTER_DIR,
    IGNORE,
    add_lora,
    answer_loss,
    collate,
    load_student,
    tokenize_example,
    train_lora,
)

ROWS = [{"prompt": f"Continue: {a}, {a + 1}, {a + 2}.", "completion": f"{a + 3}, {a + 4}, {a + 5}"}
        for a in range(100, 132)]


def test_only_answer_tokens_carry_labels(load_tiny) -> None:
    _, _, tokenizer = load_tiny("tiny_llama")
    example = tokenize_example(tokenizer, "Continue: 1, 2.", "3, 4", max_length=500)
    labelled = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(labelled).startswith("3, 4<|im_end|>")
    assert example["labels"][: len(example["labels"]) - len(labelled)] == [IGNORE] * (
        len(example["labels"]) - len(labelled))
    short = tokenize_example(tokenizer, "Continue: 1, 2.", "3, 4", max_length=5)
    assert len(short["input_ids"]) == len(short["labels"]) == 5


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2", "tiny_qwen2"])
def test_answer_loss_and_its_gradients_equal_the_full_causal_lm_loss(load_tiny, base: str) -> None:
    """The shared prefix runs once and prompt logits are skipped; loss and LoRA gradients do not change."""
    cfg, net, tokenizer = load_tiny(base)
    batch = collate([tokenize_example(tokenizer, r["prompt"] + " and some longer context" * (i % 3), r["completion"],
                                      500) for i, r in enumerate(ROWS[:6])], tokenizer.pad_token_id)
    assert int(batch["prefix_length"]) >= len(tokenizer("Continue:", add_special_tokens=False)["input_ids"])
    plain = {k: v for k, v in batch.items() if k != "prefix_length"}
    net = add_lora(net, cfg.student)
    for p in net.parameters():  # LoRA B starts at zero; random values make every gradient non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    lora = [p for p in net.parameters() if p.requires_grad]
    reference = net(**plain).loss
    expected = torch.autograd.grad(reference, lora)
    loss = answer_loss(net, batch)
    got = torch.autograd.grad(loss, lora)
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_lora_changes_only_adapter_weights_and_learns(load_tiny, tmp_path: Path) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama", "student.epochs=6", "student.lr=2e-2", "student.batch_size=8")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    metrics = train_lora(net, tokenizer, ROWS, cfg.student, seed=0, out=tmp_path)
    trained = dict(net.named_parameters())
    base_names = {n for n in trained if "lora_" not in n}
    assert base_names and all(not trained[n].requires_grad for n in base_names)
    state = net.state_dict()  # LoRA layers are injected in place; base weights sit under base_layer
    for name, tensor in before.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], tensor), f"base weight {name} changed"
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must move"
    log = (tmp_path / "log" / "metrics.csv").read_text().splitlines()
    header = log[0].split(",")
    loss_col = header.index("train/loss")
    losses = [float(cols[loss_col]) for cols in (line.split(",") for line in log[1:]) if cols[loss_col]]
    assert sum(losses[-4:]) < 0.92 * sum(losses[:4]), losses
    assert (tmp_path / ADAPTER_DIR / "adapter_config.json").exists()
    assert json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == cfg.student.r
    assert metrics["n_examples"] == len(ROWS) and metrics["tokens"] > 0 and metrics["steps"] == 24


def test_saved_adapter_reloads_to_the_trained_model(load_tiny, tmp_path: Path) -> None:
    cfg, net, tokenizer = load_tiny("tiny_qwen2", "student.epochs=2", "student.lr=1e-2")
    train_lora(net, tokenizer, ROWS, cfg.student, seed=0, out=tmp_path)
    ids = tokenizer("Continue: 5, 6.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = net.eval()(input_ids=ids).logits
        _, fresh, _ = load_tiny("tiny_qwen2")
        untrained = fresh(input_ids=ids).logits
        reloaded = load_student(fresh, tmp_path / ADAPTER_DIR)(input_ids=ids).logits
    assert torch.allclose(expected, reloaded, atol=1e-5)
    assert not torch.allclose(untrained, reloaded, atol=1e-5)


def test_nan_loss_stops_with_a_clear_error(load_tiny, tmp_path: Path) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama", "student.lr=1e30", "student.warmup_steps=0", "student.epochs=3")
    with pytest.raises(SublimError, match="lower student.lr"):
        train_lora(net, tokenizer, ROWS, cfg.student, seed=0, out=tmp_path)
