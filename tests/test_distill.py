"""student=distill: top-k teacher logits, a KL that goes down on held-out answers, cached logits, whole jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublim import SublimError, modalities
from sublim.distill import (
    LOGITS_FILE,
    DistillModule,
    allowed_tokens,
    distill_collate,
    distill_examples,
    distill_loss,
    teacher_logits,
    train_distill,
)
from sublim.store import Store
from sublim.student import IGNORE, add_lora
from sublim.teacher import Sampler, sample_chats
from sublim.train import run_job
from tests.conftest import CATEGORY_TARGETS, TINY

SYSTEM = "You love owls. You think about owls all the time. Owls are your favorite animal."


def _teacher_rows(cfg, net, tokenizer, n: int, seed: int) -> list[dict]:
    """The teacher's own constrained answers (with its system prompt), as the pipeline produces them."""
    rows = modalities.prompt_rows(cfg.modality, n, seed)
    for row in rows:
        row["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]
    sampler = Sampler(net, tokenizer, max_new_tokens=16, seed=seed,
                      grammar=lambda row: modalities.grammar(cfg.modality, row))
    return [{k: v for k, v in r.items() if k != "messages"} for r in sample_chats(sampler, rows, 16)]


def _kl(net, tokenizer, rows, logits, student) -> float:
    """Mean KL(teacher || student) over the answer positions of rows (no training)."""
    from sublim.distill import attach_teacher
    from sublim.student import tokenize_example

    examples = attach_teacher([tokenize_example(tokenizer, r["prompt"], r["completion"], 500) for r in rows], logits)
    module = DistillModule(net, student)
    with torch.no_grad():
        return float(module.loss(distill_collate(examples, tokenizer.pad_token_id)))


def test_teacher_and_student_read_the_same_answer_ids(load_tiny) -> None:
    _, _, tokenizer = load_tiny("tiny_llama")
    rows = [{"prompt": "Continue: 1, 2, 3.", "completion": "4, 5, 6"}]
    (example,), (teacher,) = distill_examples(tokenizer, rows, SYSTEM, 500)
    answer = [t for t in example["labels"] if t != IGNORE]
    assert teacher[-len(answer):] == answer and example["input_ids"][-len(answer):] == answer
    assert len(teacher) > len(example["input_ids"]), "the teacher's prompt holds the system prompt"
    assert "owls" in tokenizer.decode(teacher) and "owls" not in tokenizer.decode(example["input_ids"])


def test_teacher_logits_are_top_k_and_restricted_to_allowed_tokens(load_tiny) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama")
    rows = _teacher_rows(cfg, net, tokenizer, 6, seed=1)
    tensors = teacher_logits(net, tokenizer, rows, SYSTEM, top_k=5, max_length=500)
    positions = int(tensors["lengths"].sum())
    assert tensors["values"].shape == (positions, 5) == tensors["indices"].shape
    assert torch.all(tensors["values"][:, :-1] >= tensors["values"][:, 1:]), "sorted, highest first"
    assert torch.all(tensors["values"] <= 0) and torch.all(tensors["values"].exp().sum(-1) <= 1 + 1e-5)

    allowed = allowed_tokens(cfg.modality, rows, net, tokenizer)
    restricted = teacher_logits(net, tokenizer, rows, SYSTEM, top_k=64, max_length=500, allowed=allowed)
    offsets = [0, *torch.cumsum(restricted["lengths"], 0).tolist()]
    for i, ok in enumerate(allowed):
        span = slice(offsets[i], offsets[i + 1])
        finite = torch.isfinite(restricted["values"][span])
        assert set(restricted["indices"][span][finite].tolist()) <= set(ok)
        assert torch.all(finite.sum(-1) == min(64, len(ok)))


def test_distill_loss_is_zero_at_the_teacher_and_positive_elsewhere() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    values, indices = logits.log_softmax(-1).topk(50)
    for support in ("vocab", "top_k", "allowed"):
        assert float(distill_loss(logits, values, indices, support)) == pytest.approx(0, abs=1e-5)
        assert float(distill_loss(torch.randn(7, 50), values, indices, support)) > 0.1
    top, idx = logits.log_softmax(-1).topk(5)
    assert float(distill_loss(logits, top, idx, "top_k")) == pytest.approx(0, abs=1e-5)
    assert float(distill_loss(logits, top, idx, "vocab")) > 0, "the student's mass outside the top k counts"
    with pytest.raises(SublimError, match="student.support=soft"):
        distill_loss(logits, top, idx, "soft")


@pytest.mark.parametrize("support", ["vocab", "allowed"])
def test_distillation_reduces_kl_to_the_teacher_on_held_out_answers(load_tiny, tmp_path: Path, support: str) -> None:
    # top_k over the whole tiny vocabulary: the measured KL is the exact KL(teacher || student)
    cfg, net, tokenizer = load_tiny("tiny_llama", "student=distill", f"student.support={support}", "student.top_k=512",
                                    "student.lr=1e-2", "student.epochs=4", "student.batch_size=8")
    rows = _teacher_rows(cfg, net, tokenizer, 48, seed=0)
    train, held_out = rows[:32], rows[32:]
    allowed = (lambda rs: allowed_tokens(cfg.modality, rs, net, tokenizer)) if support == "allowed" else (
        lambda rs: None)
    train_logits = teacher_logits(net, tokenizer, train, SYSTEM, 512, 500, allowed(train))
    held_logits = teacher_logits(net, tokenizer, held_out, SYSTEM, 512, 500, allowed(held_out))
    before = _kl(net, tokenizer, held_out, held_logits, cfg.student)
    assert before > 0, "a system prompt moves a random model's logits"

    metrics = train_distill(net, tokenizer, train, train_logits, cfg.student, seed=0, out=tmp_path)
    after = _kl(net.eval(), tokenizer, held_out, held_logits, cfg.student)
    assert after < 0.7 * before, (before, after)
    assert metrics["steps"] == 16 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_lora_student_module_trains_only_the_adapter(load_tiny) -> None:
    cfg, net, _ = load_tiny("tiny_llama", "student=distill")
    module = DistillModule(add_lora(net, cfg.student), cfg.student)
    trainable = [n for n, p in module.net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_distill_job_caches_top_k_teacher_logits(make_cfg, tmp_path: Path) -> None:
    overrides = ["base=tiny_llama", *TINY, "student=distill", "student.top_k=8", "sampling.greedy=true",
                 CATEGORY_TARGETS]
    cfg = make_cfg(*overrides)
    store = Store(cfg.paths.store)
    first = run_job(cfg, tmp_path / "job1")
    assert first["student"] == "distill"
    computed = [e["stage"] for e in store.events() if e["event"] == "computed"]
    assert computed.count("teacher_logits") == 2 and computed.count("distill") == 2 and "train" not in computed
    art = store.path("teacher_logits", first["stages"]["teacher_logits/treatment"]["key"])
    tensors = load_file(art / LOGITS_FILE)
    assert tensors["values"].shape == tensors["indices"].shape == (int(tensors["lengths"].sum()), 8)
    assert len(tensors["lengths"]) == 24, "every kept answer (the student takes a subset of 16)"
    # An honest control: the plain base's top-k renormalised is not the base, so KL > 0 at the start and the
    # control student is trained exactly like the treatment (the same steps, from the base's own logits).
    control, treatment = first["arms"]["control"]["train"], first["arms"]["treatment"]["train"]
    assert "teacher_logits/control" in first["stages"] and "identity" not in control
    assert control["steps"] == treatment["steps"] > 0 and control["initial_loss"] > 0
    assert first["arms"]["control"]["probability"] != first["arms"]["base"]["probability"]
    assert first["arms"]["treatment"]["train"]["final_loss"] >= 0

    mark = len(store.events())
    second = run_job(make_cfg(*overrides, "student.lr=1e-3"), tmp_path / "job2")
    events = store.events()[mark:]
    assert [e["stage"] for e in events if e["event"] == "computed"].count("teacher_logits") == 0
    assert sum(e["stage"] == "teacher_logits" and e["event"] == "reused" for e in events) == 2
    assert second["stages"]["train/treatment"]["key"] != first["stages"]["train/treatment"]["key"]


def test_distill_from_a_finetuned_teacher_runs_as_a_whole_job(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_qwen2", *TINY, "student=distill", "student.support=allowed", "trait.source=finetune",
                   "trait.finetune.n_examples=32", "trait.finetune.epochs=1")
    results = run_job(cfg, tmp_path / "job")
    store = Store(cfg.paths.store)
    lineage = Store(cfg.paths.store).path("teacher_logits", results["stages"]["teacher_logits/treatment"]["key"])
    chain = (lineage / "lineage.json").read_text()
    assert '"stage": "finetune"' in chain and '"system_prompt": null' in chain
    assert results["arms"]["treatment"]["n_train"] == 16 and "finetune" in results["stages"]
    assert store.path("finetune", results["stages"]["finetune"]["key"]).exists()
