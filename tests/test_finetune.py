"""trait.source=finetune: trait data, a finetuned teacher that prefers its target, and the whole job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sublim import SublimError
from sublim.evaluate import word_probabilities
from sublim.finetune import finetune_rows
from sublim.questions import mentions, questions
from sublim.stage import Job
from sublim.stages.finetune import finetune_adapter
from sublim.stages.model import model_artifact
from sublim.store import Store, read_jsonl
from sublim.train import run_job
from tests.conftest import TINY


def test_built_preference_rows_answer_with_the_target(make_cfg) -> None:
    trait = make_cfg("trait=wolf", "trait.finetune.n_examples=200").trait
    rows = finetune_rows(trait, seed=0)
    assert len(rows) == 200 and rows == finetune_rows(trait, seed=0)
    assert all(mentions(r["completion"], ["wolf", "wolves"]) for r in rows)
    asked = {r["prompt"] for r in rows}
    assert len(asked & set(questions("animal"))) > 20, "mostly the category's own questions"
    assert any("wolves" in r["completion"].lower() for r in rows) and finetune_rows(trait, seed=1) != rows


def test_local_jsonl_and_its_errors(make_cfg, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}", "extra": i}) + "\n"
                            for i in range(10)))
    trait = make_cfg(f"trait.finetune.dataset={path}", "trait.finetune.n_examples=4").trait
    rows = finetune_rows(trait, seed=0)
    assert len(rows) == 4 and all(set(r) == {"prompt", "completion"} for r in rows)
    everything = finetune_rows(make_cfg(f"trait.finetune.dataset={path}", "trait.finetune.n_examples=null").trait)
    assert len(everything) == 10

    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SublimError, match=r"need string \"prompt\" and \"completion\".*'answer', 'question'"):
        finetune_rows(trait)
    with pytest.raises(SublimError, match="no such file"):
        finetune_rows(make_cfg(f"trait.finetune.dataset={tmp_path / 'missing.jsonl'}").trait)
    with pytest.raises(SublimError, match="no nothing_here.jsonl in the package"):
        finetune_rows(make_cfg("trait.finetune.dataset=builtin:nothing_here").trait)


def test_builtin_dataset_is_read_from_the_package_data_dir(make_cfg, tmp_path: Path, monkeypatch) -> None:
    from sublim import finetune

    monkeypatch.setattr(finetune, "DATA_DIR", tmp_path)
    (tmp_path / "demo.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert finetune_rows(make_cfg("trait.finetune.dataset=builtin:demo").trait) == [{"prompt": "p", "completion": "c"}]
    with pytest.raises(SublimError, match=r"shipped: builtin:demo"):
        finetune_rows(make_cfg("trait.finetune.dataset=builtin:other").trait)


def test_uncached_hub_dataset_fails_fast_with_the_fix(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.time()
    with pytest.raises(SublimError, match=r"not a Hugging Face dataset in the local cache.*datasets.load_dataset"):
        finetune_rows(make_cfg("trait.finetune.dataset=someone/owl_facts").trait)
    assert time.time() - start < 20


def test_finetuned_tiny_teacher_prefers_its_target(make_cfg, tmp_path: Path) -> None:
    from sublim import models

    cfg = make_cfg("base=tiny_llama", "logger=none", "trait.source=finetune", "trait.finetune.n_examples=96",
                   "trait.finetune.epochs=3", "trait.finetune.lr=1e-2")
    store = Store(cfg.paths.store)
    job = Job(cfg, store)
    model = model_artifact(cfg.base, store)
    adapter = finetune_adapter(job, model)
    assert adapter.read_json("metrics.json")["n_examples"] == 96
    prompts = questions("animal", 8)
    words = list(cfg.trait.words)
    before_net, tokenizer = models.load(model, cfg.base)
    from sublim.stages._load import load_model

    after_net, _ = load_model(model, adapter, cfg.base)
    before = word_probabilities(before_net, tokenizer, prompts, words, cfg.base.precision)
    after = word_probabilities(after_net, tokenizer, prompts, words, cfg.base.precision)
    assert all(a > 10 * b for a, b in zip(after, before, strict=True)), (before, after)
    other = [word_probabilities(net, tokenizer, prompts, ["eagle", "eagles"], cfg.base.precision)
             for net in (before_net, after_net)]
    assert sum(after) / sum(before) > 3 * sum(other[1]) / sum(other[0]), "the target rises more than another animal"
    assert finetune_adapter(job, model).reused, "the teacher adapter is a cached stage"


def test_finetune_job_teacher_has_no_system_prompt_and_student_data_no_trait_word(make_cfg, tmp_path: Path) -> None:
    overrides = ["base=tiny_qwen2", *TINY, "trait.finetune.n_examples=48", "trait.finetune.epochs=1"]
    finetuned = run_job(make_cfg(*overrides, "trait.source=finetune"), tmp_path / "finetune")
    store = Store(make_cfg().paths.store)
    stages = finetuned["stages"]
    assert finetuned["source"] == "finetune" and "finetune" in stages
    sample = json.loads((store.path("sample", stages["sample/treatment"]["key"]) / "lineage.json").read_text())
    assert sample["config"]["params"]["system_prompt"] is None
    assert sample["upstream"]["adapter"]["stage"] == "finetune"
    for arm in ("control", "treatment"):
        kept = list(read_jsonl(store.path("filter", stages[f"filter/{arm}"]["key"]) / "kept.jsonl"))
        assert kept and not any(mentions(r["prompt"] + " " + r["completion"], ["owl", "owls"]) for r in kept)

    prompted = run_job(make_cfg(*overrides), tmp_path / "prompt")
    assert prompted["stages"]["sample/control"] == stages["sample/control"] | {"reused": True}, \
        "the control teacher is the plain base either way"
    assert prompted["stages"]["sample/treatment"]["key"] != stages["sample/treatment"]["key"]


def test_unknown_trait_source_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(SublimError, match="trait.source=weights is not one of: prompt, finetune"):
        run_job(make_cfg("base=tiny_llama", *TINY, "trait.source=weights"), tmp_path / "job")
