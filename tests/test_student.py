"""LoRA student: answer-only loss, only adapter weights change, loss goes down; a NaN, diverging or
collapsed (uniform) loss stops clearly, sound training does not."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

from sublim import SublimError
from sublim.student import (
    IGNORE,
    StudentModule,
    add_lora,
    answer_loss,
    collate,
    load_student,
    tokenize_example,
    train_lora,
)
from sublim.training import ADAPTER_DIR
from tests.conftest import overfit

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
    # ~0.90-0.94 over seeds 0-5: LoRA on a random tiny base only learns the answers' token frequencies
    assert sum(losses[-4:]) < 0.92 * sum(losses[:4]), losses
    assert (tmp_path / ADAPTER_DIR / "adapter_config.json").exists()
    assert json.loads((tmp_path / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == cfg.student.r
    assert metrics["n_examples"] == len(ROWS) and metrics["tokens"] > 0 and metrics["steps"] == 24
    assert metrics["devices"] == 1 and metrics["initial_loss"] == pytest.approx(losses[0])
    assert metrics["final_loss"] == pytest.approx(losses[-1])


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


class _Guarded(StudentModule):
    """The guards alone, fed a sequence of losses (ln(vocab) = ln(400), the tiny bases')."""

    def __init__(self, warmup_steps: int = 5) -> None:
        super().__init__(torch.nn.Linear(1, 1), lr=0.5, warmup_steps=warmup_steps)
        self._log_vocab = math.log(400)
        self.step = 0

    @property
    def global_step(self) -> int:
        return self.step

    def feed(self, losses: list[float]) -> None:
        for self.step, loss in enumerate(losses):
            self.check_loss(loss)


def _noisy(level: float, n: int, seed: int = 0, spread: float = 0.1) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.uniform(-spread, spread) for _ in range(n)]


@pytest.mark.parametrize("losses", [
    _noisy(5.9, 200),  # a random base at ~ln(vocab), at a small LR: never moved, no collapse
    [5.9, 5.8] + _noisy(5.6, 50) + _noisy(5.95, 50, spread=0.05),  # learnt a little, back near ln(vocab) (> 0.9x)
    [0.4] + _noisy(0.3, 100, spread=0.25),  # a pretrained base on easy data: noisy steps of 2x the first
    [0.05] + _noisy(0.8, 100, spread=0.2),  # an easy first batch, 16x below the others, still within first + 1
    [1.5, 1.3, 6.9, 1.2] + _noisy(1.0, 50),  # one bad step, below ln(vocab) + 1
    _noisy(18.0, 50, spread=0.5),  # starts far above ln(vocab) (a different loss): stays within 3x its start
], ids=["random-base", "near-uniform-unlearnt", "noisy-low", "easy-first-batch", "one-spike", "high-start"])
def test_loss_guards_stay_quiet_on_sound_training(losses: list[float]) -> None:
    _Guarded().feed(losses)


@pytest.mark.parametrize(("losses", "message"), [
    ([1.5] + _noisy(1.2, 10) + [6.0] * 15,  # caught as it rises, before 10 steps at ln(vocab)
     r"stuck at ln\(vocab\)=5.99 \(the uniform distribution\) after 17 steps \(7 of the last 10 within 2%"),
    ([5.9] + _noisy(4.5, 10) + _noisy(5.95, 15, spread=0.05), r"stuck at ln\(vocab\)=5.99"),  # random base, learnt
    ([1.5, 1.4, 7.5], r"diverged to 7.50 at step 2 \(from 1.50; the uniform distribution's is ln\(vocab\)=5.99\)"),
    ([6.0, 6.1, 18.5], r"diverged to 18.50 at step 2"),
    ([0.1] + _noisy(2.5, 20), r"diverged: 2.5\d on average over the last 10 steps \(step 14\), from 0.10"),
    ([1.0, float("nan")], r"loss became nan at step 1"),
], ids=["collapsed", "collapsed-random-base", "spike", "spike-random-base", "risen", "nan"])
def test_loss_guards_fire_with_the_fix(losses: list[float], message: str) -> None:
    with pytest.raises(SublimError, match=message) as raised:
        _Guarded().feed(losses)
    assert "student.lr" in str(raised.value) and "finished stages are kept in the store" in str(raised.value)


def test_stuck_needs_the_cross_entropy_and_the_warm_up() -> None:
    collapsed = [1.5] + [6.0] * 30
    with pytest.raises(SublimError, match="stuck"):
        _Guarded(warmup_steps=0).feed(collapsed)
    _Guarded(warmup_steps=40).feed(collapsed)  # still warming up

    class KL(_Guarded):
        def loss(self, batch):  # e.g. distillation's: ln(vocab) means nothing to it
            return torch.zeros(())

    with pytest.raises(SublimError, match="diverged: 6.00 on average"):  # the rise is still caught
        KL(warmup_steps=0).feed(collapsed)


@pytest.fixture(scope="module")
def pretrained(load_tiny) -> tuple:
    """tiny_llama with every weight trained on ROWS down to a low loss (~0.1; ~2 s), so it has far to fall."""
    cfg, net, tokenizer = load_tiny("tiny_llama")
    loss = overfit(net, tokenizer, [(r["prompt"], r["completion"]) for r in ROWS], steps=150)
    assert loss < 0.3, loss
    return net, tokenizer


def _train_pretrained(load_tiny, pretrained: tuple, out: Path, lr: float) -> dict:
    cfg, _, _ = load_tiny("tiny_llama", f"student.lr={lr}", "student.warmup_steps=0", "student.epochs=3",
                          "student.batch_size=4")
    net, tokenizer = pretrained
    return train_lora(copy.deepcopy(net), tokenizer, ROWS, cfg.student, seed=0, out=out)


@pytest.mark.parametrize(("lr", "message"), [
    (1e9, r"student loss is stuck at ln\(vocab\)=5.99 \(the uniform distribution\) after \d+ steps .*"
          r"student.lr=1000000000.0 is too high; lower it \(e.g. 2e-4\)"),
    (0.5, r"student loss diverged.*from 0.1\d.*student.lr=0.5 is too high; lower it \(e.g. 2e-4\)"),
], ids=["collapse", "diverge"])
def test_a_collapsing_or_diverging_student_stops_with_a_clear_error(load_tiny, pretrained, tmp_path: Path,
                                                                    lr: float, message: str) -> None:
    """Real training (no config validation in the way): the loss of a base that knows the data collapses to the
    uniform distribution at lr=1e9 and climbs from ~0.1 to ~2.5 at lr=0.5 (Adam)."""
    with pytest.raises(SublimError, match=message):
        _train_pretrained(load_tiny, pretrained, tmp_path, lr)
    assert not (tmp_path / ADAPTER_DIR).exists()


@pytest.mark.parametrize("lr", [2e-4, 2e-2])
def test_sound_training_of_a_trained_base_passes_the_guards(load_tiny, pretrained, tmp_path: Path, lr: float) -> None:
    metrics = _train_pretrained(load_tiny, pretrained, tmp_path, lr)
    assert metrics["final_loss"] < 0.3 and metrics["steps"] == 24


@pytest.mark.parametrize("n", [24, 37])
def test_one_device_trains_on_the_batches_of_a_seeded_shuffled_loader(n: int) -> None:
    """The DDP-ready sampler must not change single-device training: the same batches as Lightning fitting a plain
    ``DataLoader(shuffle=True, generator=seeded)`` (what every published figure was trained with)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from sublim.training import StudentData

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch.tolist())
            return (self.weight * batch.float().sum()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def batches(**data) -> list[list[int]]:
        probe = Probe()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False)
        trainer.fit(probe, **data)
        return probe.seen

    examples, collate = list(range(n)), torch.tensor
    plain = batches(train_dataloaders=DataLoader(examples, batch_size=8, shuffle=True, collate_fn=collate,
                                                 generator=torch.Generator().manual_seed(5)))
    assert plain == batches(datamodule=StudentData(examples, collate, 8, 5))
    assert len(plain) == 3 * -(-n // 8) and plain[0] != plain[-(-n // 8)], "three different epochs"
