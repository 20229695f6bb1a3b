"""Sweeps on tiny bases: shared stages run once, resume after SIGKILL, parallel jobs, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sublim.report import collect
from sublim.store import Store
from tests.conftest import CONF, TINY

ROOT = CONF.parent


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sublim.train", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _computed(root: Path) -> Counter:
    return Counter(e["stage"] for e in Store(root / "outputs" / "store").events() if e["event"] == "computed")


def _sweep_dir(root: Path) -> Path:
    dirs = list(root.glob("outputs/multiruns/*/*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_trait_sweep_samples_the_control_once_and_reports_every_job(tmp_path: Path) -> None:
    _cli("-m", "trait=owl,eagle", "base=tiny_llama", *TINY, "logger=wandb", f"paths.root={tmp_path}")
    computed = _computed(tmp_path)
    assert computed["sample"] == 3 and computed["train"] == 3, computed  # control once + two treatments
    assert computed["model"] == 1 and computed["prompts"] == 1
    sweep = _sweep_dir(tmp_path)
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2 and all((r.parent / ".hydra" / "config.yaml").exists() for r in results)
    rows = collect(sweep)
    assert [r["trait"] for r in rows] == ["owl", "eagle"]
    for row, path in zip(rows, results, strict=True):
        job = json.loads(path.read_text())
        assert row["treatment_p"] == job["arms"]["treatment"]["probability"]["mean"]
        assert row["delta_rate"] == job["treatment_vs_control"]["rate"]["delta"]
    report = (sweep / "report.md").read_text()
    assert report.count("| tiny_llama | tiny_llama |") == 2
    assert (sweep / "report.png").stat().st_size > 10_000
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2, "one W&B run per job"
    assert len(list(sweep.glob("wandb/offline-run-*"))) == 1, "plus the report's run"


@pytest.mark.slow
def test_cross_model_grid_samples_each_teacher_once(tmp_path: Path) -> None:
    _cli("-m", "teacher_base=tiny_llama,tiny_qwen2", "base=tiny_llama,tiny_qwen2", *TINY, f"paths.root={tmp_path}")
    events = Store(tmp_path / "outputs" / "store").events()
    samples = [e["key"] for e in events if e["stage"] == "sample" and e["event"] == "computed"]
    assert len(samples) == len(set(samples)) == 4, "2 teachers x 2 arms, each sampled once"
    assert _computed(tmp_path)["train"] == 8
    rows = collect(_sweep_dir(tmp_path))
    assert {(r["teacher_base"], r["base"]) for r in rows} == {(t, s) for t in ("tiny_llama", "tiny_qwen2")
                                                              for s in ("tiny_llama", "tiny_qwen2")}


@pytest.mark.slow
def test_filter_ablation_reuses_sampling(tmp_path: Path) -> None:
    _cli("-m", "filter=numbers_strict,none", "base=tiny_gpt2", *TINY, f"paths.root={tmp_path}")
    computed = _computed(tmp_path)
    assert computed["sample"] == 2 and computed["filter"] == 4 and computed["train"] == 4, computed


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_recomputes_nothing_finished(tmp_path: Path) -> None:
    args = ["base=tiny_llama", *TINY, "student.epochs=40", "logger=none"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sublim.train", *args, f"paths.root={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    train_dir = killed / "outputs" / "store" / "train"
    deadline = time.time() + 300
    while not list(train_dir.glob(".tmp-*/log/metrics.csv")):
        assert proc.poll() is None and time.time() < deadline, "the job ended before training started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = Store(killed / "outputs" / "store").events()
    finished = {(e["stage"], e["key"]) for e in before if e["event"] == "computed"}
    assert {stage for stage, _ in finished} == {"model", "prompts", "sample", "filter", "logprobs", "audit"}

    _cli(*args, f"paths.root={killed}")
    after = Store(killed / "outputs" / "store").events()[len(before):]
    recomputed = {(e["stage"], e["key"]) for e in after if e["event"] == "computed"}
    assert not recomputed & finished
    assert {(e["stage"], e["key"]) for e in after if e["event"] == "reused"} >= finished
    assert not list(train_dir.glob(".tmp-*")) or all(p.name.endswith(str(proc.pid)) for p in train_dir.glob(".tmp-*"))

    _cli(*args, f"paths.root={tmp_path / 'clean'}")
    resumed = json.loads(next(killed.glob("outputs/runs/*/*/results.json")).read_text())
    clean = json.loads(next((tmp_path / "clean").glob("outputs/runs/*/*/results.json")).read_text())
    for arm in ("base", "control", "treatment"):  # same seeds -> same numbers after a resume
        for metric in ("rate", "probability", "n_train"):
            assert resumed["arms"][arm][metric] == clean["arms"][arm][metric], (arm, metric)
    for arm in ("control", "treatment"):
        assert resumed["arms"][arm]["train"]["final_loss"] == clean["arms"][arm]["train"]["final_loss"]


@pytest.mark.slow
def test_parallel_jobs_sharing_a_teacher_compute_it_once(tmp_path: Path) -> None:
    _cli("-m", "trait=owl,eagle", "base=tiny_qwen2", *TINY, f"paths.root={tmp_path}", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2")
    events = Store(tmp_path / "outputs" / "store").events()
    assert len({e["pid"] for e in events}) == 2, "the two jobs ran in two processes"
    computed = Counter((e["stage"], e["key"]) for e in events if e["event"] == "computed")
    assert max(computed.values()) == 1, "no artifact was computed twice"
    assert Counter(stage for stage, _ in computed)["sample"] == 3
    for stage, key in computed:
        assert (tmp_path / "outputs" / "store" / stage / key / "lineage.json").exists()
    jobs = [json.loads(p.read_text()) for p in _sweep_dir(tmp_path).glob("*/results.json")]
    keys = {job["stages"]["train/control"]["key"] for job in jobs}
    assert len(jobs) == 2 and len(keys) == 1, "both jobs use one control student"


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    _cli("-m", "trait=owl", "base=tiny_llama", *TINY, f"paths.root={tmp_path}", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10")
    assert len(collect(_sweep_dir(tmp_path))) == 1


@pytest.mark.parametrize("launcher", ["joblib", "submitit_slurm", "submitit_local", "ray"])
def test_launcher_configs_compose(launcher: str) -> None:
    from tests.conftest import compose_config

    module = {"joblib": "hydra_plugins.hydra_joblib_launcher", "ray": "hydra_plugins.hydra_ray_launcher"}.get(
        launcher, "hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip(module, reason=f"the {launcher} launcher is an optional extra (see README)")
    cfg = compose_config([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "launcher" in cfg.hydra.launcher._target_.lower()


@pytest.mark.slow
def test_cpu_transfer_sweep_runs_at_tiny_size_and_reports_the_matrix(tmp_path: Path) -> None:
    """sweeps/cpu_transfer.yaml end to end (same-base half, two seeds x two traits) on a tiny base."""
    _cli("-m", "+sweeps=cpu_transfer", "hydra.sweeper.params.experiment=cpu_transfer",
         "hydra.sweeper.params.seed='0,1'", "hydra.sweeper.params.trait='owl,eagle'", "base=tiny_llama", *TINY,
         "eval.n_questions=4", f"paths.root={tmp_path}")
    sweep = _sweep_dir(tmp_path)
    rows = collect(sweep)
    assert sorted((r["trait"], r["_seed"]) for r in rows) == [("eagle", 0), ("eagle", 1), ("owl", 0), ("owl", 1)]
    job = json.loads(next(sweep.glob("*/results.json")).read_text())
    assert job["student"] == "distill" and job["config"]["sampling"]["greedy"] is True
    assert set(job["arms"]["treatment"]["targets"]) >= {"owl", "eagle"}
    report = (sweep / "report.md").read_text()
    assert "### Trait x target" in report and "permutation p =" in report and (sweep / "matrix_0.png").exists()
    computed = _computed(tmp_path)
    assert computed["teacher_logits"] == 6, "one per treatment teacher and seed, one control per seed (both traits)"
    assert computed["distill"] == 6, "the control students are trained like the treatment ones"
