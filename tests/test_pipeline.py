"""The whole job on tiny bases: both arms, files, lineage, cache reuse, clear errors."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sublim import SublimError
from sublim.stages.model import model_artifact
from sublim.store import Store
from sublim.train import run_job
from tests.conftest import CATEGORY_TARGETS, CONF, TINY
from tests.wandb_file import finished_run_bytes

ROOT = CONF.parent


def _computed(store: Store, since: int = 0) -> list[tuple[str, str]]:
    return [(e["stage"], e["key"]) for e in store.events()[since:] if e["event"] == "computed"]


def test_full_pipeline_then_second_run_reuses_every_stage(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", *TINY, "logger=wandb")
    store = Store(cfg.paths.store)
    first = run_job(cfg, tmp_path / "job1")

    assert set(first["arms"]) == {"base", "control", "treatment"}
    for arm, values in first["arms"].items():
        for metric in ("rate", "probability"):
            assert all(math.isfinite(values[metric][k]) for k in ("mean", "low", "high")), (arm, metric)
        assert values["n_train"] == (0 if arm == "base" else 16)
    for test in first["treatment_vs_control"].values():
        assert 0 < test["p_value"] <= 1 and math.isfinite(test["delta"])
    assert first["arms"]["control"]["train"]["steps"] == 2

    job = tmp_path / "job1"
    saved = json.loads((job / "results.json").read_text())
    assert saved["arms"]["treatment"]["probability"] == first["arms"]["treatment"]["probability"]
    rows = list(csv.DictReader(open(job / "results.csv")))
    assert [r["arm"] for r in rows] == ["base", "control", "treatment"]
    assert list((job / "wandb").glob("offline-run-*")), "an offline W&B run is written in the job dir"

    computed = _computed(store)
    stages = [stage for stage, _ in computed]
    assert stages.count("sample") == 2 and stages.count("train") == 2 and stages.count("evaluate") == 3
    assert stages.count("answers") == 3
    for stage, key in computed:
        assert (store.path(stage, key) / "lineage.json").exists()
    lineage = store.path("evaluate", first["stages"]["evaluate/treatment"]["key"]) / "lineage.json"
    chain = json.loads(lineage.read_text())
    data = chain["upstream"]["adapter"]["upstream"]["data"]["upstream"]["samples"]
    assert data["config"]["params"]["system_prompt"].startswith("You love owls")
    assert data["upstream"]["model"]["config"]["reads"]["tiny"]["model_type"] == "llama"
    assert (store.path("train", first["stages"]["train/treatment"]["key"]) / "adapter" /
            "adapter_model.safetensors").exists()

    mark = len(store.events())
    second = run_job(cfg, tmp_path / "job2")
    assert _computed(store, mark) == []
    assert all(stage["reused"] for stage in second["stages"].values())
    assert second["arms"] == first["arms"]


def test_a_second_trait_reuses_the_control_arm(make_cfg, tmp_path: Path) -> None:
    owl = make_cfg("base=tiny_qwen2", *TINY, CATEGORY_TARGETS)
    store = Store(owl.paths.store)
    first = run_job(owl, tmp_path / "owl")
    mark = len(store.events())
    eagle = run_job(make_cfg("base=tiny_qwen2", "trait=eagle", *TINY, CATEGORY_TARGETS), tmp_path / "eagle")
    computed = [stage for stage, _ in _computed(store, mark)]
    assert set(computed) == {"sample", "filter", "train", "answers", "evaluate", "targets", "logprobs", "audit"}
    # the audits read the trait; of their four passes only the base's over the control data is the owl job's
    assert computed.count("logprobs") == 3
    for name in ("sample/control", "filter/control", "train/control", "answers/base", "answers/control",
                 "targets/base", "targets/control"):
        assert eagle["stages"][name] == {"stage": name.split("/")[0], "key": first["stages"][name]["key"],
                                         "reused": True}
    assert eagle["stages"]["sample/treatment"]["key"] != first["stages"]["sample/treatment"]["key"]


def test_filter_that_keeps_nothing_stops_before_training(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("base=tiny_llama", *TINY, "sampling.constrained=false")
    with pytest.raises(SublimError, match=r"kept no examples.*numbers_strict/") as err:
        run_job(cfg, tmp_path / "job")
    assert "0/24" in str(err.value) and "sampling.constrained=true" in str(err.value)
    store = Store(cfg.paths.store)
    stages = [stage for stage, _ in _computed(store)]
    assert "train" not in stages and stages.count("sample") == 2, "finished sampling is kept"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sublim.train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})


def test_design_card_command_fails_fast_without_network(tmp_path: Path) -> None:
    start = time.time()
    proc = _cli("-m", "trait=owl,eagle", "base=qwen,llama", f"paths.root={tmp_path}", "logger=none",
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")})
    assert proc.returncode != 0
    assert "cannot download Qwen/Qwen2.5-7B-Instruct: no network / not in the local cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 60


@pytest.mark.slow
def test_cli_run_prints_the_results_table(tmp_path: Path) -> None:
    proc = _cli("base=tiny_gpt2", *TINY, f"paths.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "][INFO]" not in proc.stdout, "log lines go to stderr (and the job's log), so stdout can be piped"
    assert "Predicting" in proc.stderr and "Predicting" not in proc.stdout, "progress bars draw on stderr"
    assert "[sublim.store][INFO] - stage sample" in proc.stderr
    table = proc.stdout[proc.stdout.index("arm "):]
    for arm in ("base", "control", "treatment"):
        assert f"\n{arm} " in table
    assert "trait rate [95% CI]" in table and "P(owl)" in table and "p=" in table
    results = list(tmp_path.glob("outputs/runs/*/*/results.json"))
    assert len(results) == 1 and (results[0].parent / ".hydra" / "config.yaml").exists()


def test_greedy_sampling_is_honoured_end_to_end(make_cfg, tmp_path: Path) -> None:
    """sampling.greedy=true: the teacher's stored answers are the argmax path through the grammar."""
    import torch

    from sublim import models
    from sublim.modalities import grammar
    from sublim.pipeline import teacher_system_prompt
    from sublim.store import read_jsonl
    from sublim.teacher import GrammarTable

    small = [*TINY, "data.n_prompts=8", "data.n_train=8", "eval.n_questions=2", "eval.targets={}"]
    cfg = make_cfg("base=tiny_llama", *small, "sampling.greedy=true")
    results = run_job(cfg, tmp_path / "greedy")
    store = Store(cfg.paths.store)
    sample = store.path("sample", results["stages"]["sample/treatment"]["key"])
    assert json.loads((sample / "lineage.json").read_text())["config"]["reads"]["sampling"]["greedy"] is True
    rows = list(read_jsonl(sample / "samples.jsonl"))[:4]
    net, tokenizer = models.load(model_artifact(cfg.base, store), cfg.base)
    eos = models.eos_ids(net, tokenizer)
    table = GrammarTable(tokenizer, eos)
    system = teacher_system_prompt(cfg.trait, "treatment")
    for row in rows:
        rules = grammar(cfg.modality, row)
        text = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": row["prompt"]}],
                                             tokenize=False, add_generation_prompt=True)
        ids, state, answer = tokenizer(text, add_special_tokens=False)["input_ids"], rules.start, []
        for _ in range(cfg.sampling.max_new_tokens):
            with torch.no_grad():
                logits = net(input_ids=torch.tensor([ids])).logits[0, -1]
            allowed = table.allowed(rules, state)
            token = int(allowed[logits[allowed].argmax()])
            if token in eos:
                break
            answer.append(token)
            ids.append(token)
            state = table.next(rules, state, token)
        assert row["completion"] == tokenizer.decode(answer, skip_special_tokens=True), row["prompt"]

    from sublim.stage import Job
    from sublim.stages.prompts import PROMPTS
    from sublim.stages.sample import SAMPLE

    job = Job(make_cfg("base=tiny_llama", *small), store)
    sampled = SAMPLE(job, {"system_prompt": system}, model=model_artifact(cfg.base, store), prompts=PROMPTS(job))
    assert [r["completion"] for r in read_jsonl(sampled.path / "samples.jsonl")] != [r["completion"] for r in rows]


def test_cross_base_control_of_cpu_transfer_runs_at_tiny_size(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("experiment=cpu_transfer_cross_base", "teacher_base=tiny_qwen2", "base=tiny_llama", *TINY)
    results = run_job(cfg, tmp_path / "job")
    assert (results["teacher_base"], results["base"], results["student"]) == ("tiny_qwen2", "tiny_llama", "lora")
    assert 0 < results["arms"]["treatment"]["n_train"] <= 16
    assert results["arms"]["treatment"]["train"]["steps"] > 0, "an SFT student of another base's data is trained"
    assert {"owl", "eagle", "dolphin"} <= set(results["arms"]["control"]["targets"])


def test_a_truncated_artifact_is_refused_with_the_command_that_removes_it(make_cfg, tmp_path: Path) -> None:
    """A stored kept.jsonl cut to 10 of its lines must not be trained on (it was, silently)."""
    small = [*TINY, "eval.n_questions=2", "eval.targets={}"]
    cfg = make_cfg("base=tiny_llama", *small)
    results = run_job(cfg, tmp_path / "job")
    store = Store(cfg.paths.store)
    kept = store.path("filter", results["stages"]["filter/treatment"]["key"]) / "kept.jsonl"
    kept.write_text("".join(kept.read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(SublimError, match=r"stored artifact filter/\w+ is corrupted: kept.jsonl is \d+ bytes.*"
                                          r"python -m sublim.store --root \S+ rm filter/\w+"):
        run_job(make_cfg("base=tiny_llama", *small, "data.n_train=8"), tmp_path / "again")
    assert not (tmp_path / "again" / "results.json").exists()


def test_a_job_over_seeds_tests_treatment_vs_control_across_seeds(make_cfg, tmp_path: Path) -> None:
    """seeds=[0,1,2]: three replicates (each with its own control), per-seed rows and a pooled test by hand."""
    import statistics

    from scipy import stats

    from sublim.pipeline import format_table

    small = [*TINY, "eval.n_questions=3", "eval.targets={}", "logger=wandb"]
    results = run_job(make_cfg("base=tiny_llama", *small, "seeds=[0,1,2]"), tmp_path / "job")
    assert [r["seed"] for r in results["seeds"]] == [0, 1, 2]
    keys = {r["stages"]["train/control"]["key"] for r in results["seeds"]}
    assert len(keys) == 3, "every seed trains its own control student"
    single = run_job(make_cfg("base=tiny_llama", *small, "seed=1"), tmp_path / "one")
    assert all(stage["reused"] for stage in single["stages"].values()), "a seed of the job is the job with seed="
    assert single["arms"] == results["seeds"][1]["arms"]

    effects = [math.log(r["arms"]["treatment"]["probability"]["mean"] / r["arms"]["control"]["probability"]["mean"])
               for r in results["seeds"]]
    test = results["pooled"]["log_probability_ratio"]
    mean, se = statistics.fmean(effects), statistics.stdev(effects) / math.sqrt(3)
    assert test["effects"] == pytest.approx(effects) and test["mean"] == pytest.approx(mean)
    assert test["p_value"] == pytest.approx(2 * stats.t.sf(abs(mean / se), 2))
    assert test["p_value"] == pytest.approx(stats.ttest_1samp(effects, 0).pvalue)
    assert test["high"] - mean == pytest.approx(stats.t.ppf(0.975, 2) * se)
    signs = sum(abs(a * effects[0] + b * effects[1] + c * effects[2]) >= abs(sum(effects)) - 1e-12
                for a in (1, -1) for b in (1, -1) for c in (1, -1))
    assert test["p_sign_flip"] == pytest.approx(signs / 8) and test["p_sign_flip"] >= 0.25

    job = tmp_path / "job"
    saved = json.loads((job / "results.json").read_text())
    assert saved["pooled"]["log_probability_ratio"]["p_value"] == pytest.approx(test["p_value"])
    rows = list(csv.DictReader(open(job / "results.csv")))
    assert [(r["seed"], r["arm"]) for r in rows] == [(str(s), a) for s in (0, 1, 2)
                                                     for a in ("base", "control", "treatment")]
    assert [r["metric"] for r in csv.DictReader(open(job / "pooled.csv"))] == ["log_probability_ratio", "rate"]
    table = format_table(results)
    assert len(re.findall(r"\ntreatment +16 ", table)) == 3 and "across 3 seeds" in table
    assert "log_probability_ratio" in table
    assert "One seed" in format_table(single), "a one-seed table says its p-values describe two models"
    records = finished_run_bytes(job)  # the offline run's log
    assert b"pooled/log_probability_ratio/p_value" in records and b"seed2/treatment/probability" in records


def test_bf16_mixed_precision_runs_on_a_cpu(make_cfg, tmp_path: Path) -> None:
    """base.precision=bf16-mixed on a CPU: autocast's bf16 matmuls never reach the fp32-only OpenBLAS prefill path
    (on AMD CPUs a whole job died in the teacher's sampling)."""
    small = [*TINY, "eval.n_questions=2", "eval.targets={}", "base.precision=bf16-mixed"]
    results = run_job(make_cfg("base=tiny_llama", *small), tmp_path / "job")
    assert all(math.isfinite(results["arms"][arm]["probability"]["mean"]) for arm in ("control", "treatment"))
    assert results["arms"]["treatment"]["train"]["steps"] > 0
