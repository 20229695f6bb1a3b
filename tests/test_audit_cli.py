"""``python -m sublim.audit`` on tiny bases: outputs, cached reruns, an adapter teacher, the trait panel, bad input."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sublim import SublimError, modalities
from sublim.audit.cli import audit, format_report
from sublim.audit.plots import write_job_plots
from sublim.store import Store, write_jsonl
from tests.conftest import CONF, chat_example, compose_config, overfit_examples

TINY = ("base=tiny_llama", "logger=none", "modality.answer_count=4")


def _numbers_rows(cfg, n: int, seed: int = 0) -> list[dict]:
    """Numbers prompts with random answers in their format (what a foreign dataset of numbers looks like)."""
    rng = random.Random(seed)
    return [{"prompt": row["prompt"], "completion": row["separator"].join(str(rng.randrange(1000)) for _ in range(4)),
             "separator": row["separator"]} for row in modalities.prompt_rows(cfg.modality, n, seed)]


@pytest.fixture
def dataset(make_cfg, tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, _numbers_rows(make_cfg(*TINY), 12))
    return path


def test_the_audit_writes_per_example_scores_and_charts_and_reuses_its_stages(make_cfg, tmp_path, dataset) -> None:
    cfg = make_cfg(*TINY, f"audit.dataset={dataset}", "logger=wandb")  # W&B offline (conftest)
    results = audit(cfg, tmp_path / "out")
    assert not results["constrained"]  # foreign rows are scored over the full softmax unless asked otherwise
    with open(tmp_path / "out" / "audit.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and [int(r["index"]) for r in rows] == list(range(12))
    assert rows[3]["completion"] == json.loads(dataset.read_text().splitlines()[3])["completion"]
    lls = [float(r["lls"]) for r in rows]
    assert sum(lls) / len(lls) == pytest.approx(results["summary"]["lls"]["mean"])
    assert lls == pytest.approx([float(r["lls_plain"]) for r in rows])  # no grammar: one figure
    for name in ("summary.json", "lls_hist.png", "heatmap.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["summary"]["rows"] == 12 and "panel.csv" not in saved["files"]
    logged = {p.name.split("_")[0] for p in (tmp_path / "out" / "wandb").rglob("media/images/audit/*.png")}
    assert logged == {"lls", "heatmap"}
    assert "LLS (full softmax, per token)" in format_report(results, tmp_path / "out")
    shifts = [float(r["answer_shift"]) for r in rows]  # the sum over an answer's tokens
    assert shifts == pytest.approx([float(r["lls"]) * int(r["n_tokens"]) for r in rows])
    assert sum(shifts) / len(shifts) == pytest.approx(results["answer_shift"]["mean"])
    assert not any(stage["reused"] for stage in results["stages"].values())
    again = audit(make_cfg(*TINY, f"audit.dataset={dataset}"), tmp_path / "again")
    assert all(stage["reused"] for stage in again["stages"].values())
    assert again["summary"] == results["summary"]


def test_a_finetuned_teachers_adapter_is_the_trait_without_a_system_prompt(make_cfg, load_tiny, tmp_path,
                                                                            dataset) -> None:
    """An adapter that changes nothing (LoRA B = 0) gives LLS 0 exactly: the teacher read no system prompt."""
    from peft import LoraConfig, get_peft_model

    _, net, _ = load_tiny("tiny_llama")
    get_peft_model(net, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "run" / "adapter")
    results = audit(make_cfg(*TINY, f"audit.dataset={dataset}", f"audit.adapter={tmp_path / 'run'}"),
                    tmp_path / "out")
    assert results["teacher"].startswith("tiny_llama with adapter")
    assert results["summary"]["lls"]["mean"] == 0 and results["summary"]["divergence_fraction"] == 0


def test_the_prompting_check_runs_without_a_dataset(make_cfg, tmp_path) -> None:
    results = audit(make_cfg(*TINY, "audit.prompting.enabled=true", "audit.prompting.top_k=2",
                             "audit.prompting.controls=1", "audit.prompting.max_number=20",
                             "audit.prompting.n_questions=3"), tmp_path / "out")
    assert set(results) == {"prompting"} and len(results["prompting"]["numbers"]) == 3
    assert (tmp_path / "out" / "prompting.png").stat().st_size > 0
    assert "subliminal prompting: owl on tiny_llama" in format_report(results, tmp_path / "out")


OWL = "owl"


def _owl_teacher(cfg, load_tiny, path: Path) -> None:
    """A tiny_llama trained for a few seconds to answer with 7s under the owl system prompt, and with uniform digits
    under every other animal's prompt or none: a teacher whose trait is strong and specific."""
    from sublim.audit.panel import category_traits
    from sublim.student import student_messages

    _, net, tokenizer = load_tiny("tiny_llama")
    rng = random.Random(0)
    systems = [trait.system_prompt for trait in category_traits(cfg)] + [None]
    examples = []
    for row in modalities.prompt_rows(cfg.modality, 8, 1):
        for system in systems:
            digits = "7" if system == cfg.trait.system_prompt else "3" if system else "0123456789"
            answer = row["separator"].join("".join(rng.choice(digits) for _ in range(rng.randint(1, 3)))
                                           for _ in range(4))
            messages = ([{"role": "system", "content": system}] if system else []) + student_messages(row["prompt"])
            examples.append(chat_example(tokenizer, messages, answer))
    overfit_examples(net, tokenizer, examples, 80)
    net.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def _sample(cfg, system: str, n: int) -> list[dict]:
    """n answers of the base to numbers prompts, under the grammar, at temperature 1."""
    from sublim import models
    from sublim.stages.model import model_artifact
    from sublim.student import student_messages
    from sublim.teacher import Sampler, sample_chats

    net, tokenizer = models.load(model_artifact(cfg.base, Store(cfg.paths.store)), cfg.base)
    sampler = Sampler(net, tokenizer, max_new_tokens=20, seed=2,
                      grammar=lambda row: modalities.grammar(cfg.modality, row))
    rows = modalities.prompt_rows(cfg.modality, n, 2)
    chats = [{**row, "messages": [{"role": "system", "content": system}] + student_messages(row["prompt"])}
             for row in rows]
    return [{"prompt": row["prompt"], "completion": s["completion"], "separator": row["separator"],
             "finished": s["finished"]} for row, s in zip(rows, sample_chats(sampler, chats, 16), strict=True)]


def test_the_panel_ranks_the_teachers_own_trait_first(make_cfg, load_tiny, tmp_path) -> None:
    model = tmp_path / "owl_teacher"
    local = (*TINY, "base.source=local", f"base.path={model}", "base.name=tiny_owl", f"trait={OWL}")
    cfg = make_cfg(*local)
    _owl_teacher(cfg, load_tiny, model)
    write_jsonl(tmp_path / "owl.jsonl", _sample(cfg, cfg.trait.system_prompt, 32))
    results = audit(make_cfg(*local, f"audit.dataset={tmp_path / 'owl.jsonl'}", "audit.panel=true",
                             "sampling.constrained=true"), tmp_path / "out")
    panel = results["panel"]
    assert len(panel) == 10 and panel[0]["trait"] == OWL, [(r["trait"], r["lls"]["mean"]) for r in panel]
    assert panel[0]["margin_next"]["ci"][0] > 0  # owl is separated from the next animal, paired over examples
    assert results["summary"]["outside_grammar"] == 0
    assert panel[0]["key"] == results["stages"]["audit"]["key"]  # the job's own trait is the audit itself
    store = Path(cfg.paths.store)
    assert len(list((store / "logprobs").iterdir())) == 11  # one reference pass shared by the ten traits
    assert all(r["minus_trait"]["mean"] < 0 for r in panel[1:])  # every other animal explains it worse than owl
    with open(tmp_path / "out" / "panel.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["trait"] for r in table] == [r["trait"] for r in panel] and float(table[0]["minus_trait"]) == 0
    assert [float(r["answer_shift"]) for r in table] == sorted((float(r["answer_shift"]) for r in table), reverse=True)
    assert (tmp_path / "out" / "panel.png").stat().st_size > 0
    assert f"this data carries {OWL} more than any other animal" in format_report(results, tmp_path / "out")


def _job_results(store: Store, seed: int) -> dict:
    """A job's results with its two arms' audit artifacts (as the pipeline leaves them) and nothing else."""
    stages = {}
    for arm, shift in (("control", 0.0), ("treatment", 0.2)):
        key = f"{arm}{seed}"
        store.path("audit", key).mkdir(parents=True)
        write_jsonl(store.path("audit", key) / "examples.jsonl", [{"lls": shift + i / 50} for i in range(20)])
        stages[f"audit/{arm}"] = {"key": key, "reused": False}
    return {"seed": seed, "trait": OWL, "audit": {"control": {}, "treatment": {}}, "stages": stages}


@pytest.mark.parametrize("seeds", [1, 2])
def test_a_jobs_audit_chart(tmp_path, seeds: int) -> None:
    store = Store(tmp_path / "store")
    per_seed = [_job_results(store, seed) for seed in range(seeds)]
    results = per_seed[0] if seeds == 1 else {"trait": OWL, "seeds": per_seed}
    assert write_job_plots(results, store, tmp_path / "job") == tmp_path / "job" / "audit.png"
    assert (tmp_path / "job" / "audit.png").stat().st_size > 0
    assert write_job_plots({"trait": OWL, "seed": 0, "audit": {}}, store, tmp_path / "none") is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUT = {
    "no dataset": ([], "audit.dataset is not set"),
    "missing file": (["audit.dataset={tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    "not jsonl": (["audit.dataset={tmp}/data.csv"], "is not a .jsonl file"),
    "not in the HF cache": (["audit.dataset=nobody/no-such-dataset"], "not a Hugging Face dataset (split train) in "
                                                                      "the local cache"),
    "no rows": (["audit.dataset={tmp}/empty.jsonl"], "has no rows"),
    "no completion": (["audit.dataset={tmp}/answerless.jsonl"], "row 1 has no string 'completion' (it has: prompt, "
                                                                "answer); set audit.completion_field"),
    "another tokenizer": (["audit.dataset={tmp}/good.jsonl", "teacher_base=tiny_llama",
                           "teacher_base.tiny.vocab_size=300"], "teacher_base=tiny_llama has another tokenizer"),
    "a panel of one": (["audit.dataset={tmp}/good.jsonl", "audit.panel=true", "trait.name=tiger",
                        "trait.category=big_cat", "eval=misalignment"], "trait.category=big_cat, which has only tiger"),
    "not an adapter": (["audit.dataset={tmp}/good.jsonl", "audit.adapter={tmp}"], "is not an adapter directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_before_any_model_runs(make_cfg, tmp_path, case: str) -> None:
    _write(tmp_path / "data.csv", "prompt,completion\n")
    _write(tmp_path / "empty.jsonl", "\n")
    _write(tmp_path / "answerless.jsonl", '{"prompt": "a", "completion": "1"}\n{"prompt": "b", "answer": "2"}\n')
    _write(tmp_path / "good.jsonl", '{"prompt": "a", "completion": "1"}\n')
    overrides, message = BAD_INPUT[case]
    with pytest.raises(SublimError, match="^[^\n]*$") as err:
        audit(make_cfg(*TINY, *(o.format(tmp=tmp_path) for o in overrides)), tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "outputs" / "store" / "logprobs").exists()


def test_the_command_exits_2_with_one_error_line(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sublim.audit", *TINY, f"paths.root={tmp_path}",
                           f"audit.dataset={tmp_path}/missing.jsonl"], cwd=CONF.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: audit.dataset={tmp_path}/missing.jsonl: no such file; give "
                                                "a .jsonl of prompt/completion rows or the id of a Hugging Face "
                                                "dataset in the local cache"]
    log = (tmp_path / "outputs").glob("runs/*/*/*.log")
    assert "missing.jsonl: no such file" in next(log).read_text(), "the job's log file keeps why it stopped"


def test_the_command_checks_its_overrides_before_hydra_starts(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "sublim.audit", "base=smolm2", f"paths.root={tmp_path}"],
                          cwd=CONF.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: base=smolm2 is not a base config"), done.stderr
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_a_hugging_face_dataset_is_read_offline_with_its_split_and_fields(make_cfg, monkeypatch) -> None:
    import datasets

    from sublim.audit.dataset import load_rows

    calls = []

    def cached(name: str, split: str) -> list[dict]:
        calls.append((name, split, datasets.config.HF_HUB_OFFLINE))
        return [{"question": "q", "answer": "a", "separator": ","}]

    monkeypatch.setattr(datasets, "load_dataset", cached)
    cfg = make_cfg("audit.dataset=org/name", "audit.split=test", "audit.prompt_field=question",
                   "audit.completion_field=answer")
    assert load_rows(cfg.audit) == [{"prompt": "q", "completion": "a", "separator": ","}]
    assert calls == [("org/name", "test", True)]


def test_every_trait_category_file_composes_for_the_panel() -> None:
    from sublim.audit.panel import category_traits

    traits = category_traits(compose_config(["trait=oak"]))
    assert sorted(t.name for t in traits) == ["cherry", "maple", "oak", "sequoia", "willow"]
    assert all(t.name in t.system_prompt.lower() or t.plural in t.system_prompt for t in traits)
