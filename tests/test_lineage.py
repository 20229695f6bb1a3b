"""``python -m sublim.lineage``: a job's ancestry down to the base weights' hash, its diff and its picture."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_config

from sublim.lineage import Lineage, Node, depth, render
from sublim.lineage.__main__ import load, main
from sublim.pipeline import run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A three-generation tiny job: generation k's teachers are generation k-1's students."""
    root = tmp_path_factory.mktemp("lineage")
    results = run(compose_config([f"paths.root={root}", "base=tiny_llama", *TINY, "generations=3"]), root / "job",
                  None)
    return root / "job", results


def _root(lineage: Lineage, label: str) -> Node:
    return dict(lineage.roots)[label]


def test_the_tree_of_a_job_reaches_the_base_weights_hash_through_every_generation(job) -> None:
    job_dir, results = job
    lineage = load(str(job_dir), None)
    first, second, third = (_root(lineage, f"gen{g} train/treatment") for g in (1, 2, 3))
    # train -> data: filter -> samples: sample -> model; generation k's sample also has adapter: the k-1 student
    assert [depth(node, "model") for node in (first, second, third)] == [3, 6, 9]
    assert second.upstream["data"].upstream["samples"].upstream["adapter"] is first
    assert third.upstream["data"].upstream["samples"].upstream["adapter"] is second
    model = first.upstream["model"]
    weights = model.lineage["files"]["model.safetensors"]["sha256"]
    lines = render(lineage)
    assert [line for line in lines if "model " + model.key[:12] in line and "see above" not in line] == \
        [next(line for line in lines if weights in line)]  # printed once, with its hash; referenced after
    samples = {arm: lineage.nodes["sample", results["generations"][0]["stages"][f"sample/{arm}"]["key"]]
               for arm in ("control", "treatment")}
    assert "You love owls" in samples["treatment"].facts
    assert "You love owls" not in samples["control"].facts and "no system prompt" in samples["control"].facts
    assert "LLS" in _root(lineage, "gen1 audit/treatment").facts and "final loss" in first.facts


def test_diff_of_the_two_arms_names_the_system_prompt(job, capsys: pytest.CaptureFixture) -> None:
    job_dir, results = job
    stages = results["generations"][0]["stages"]
    store = results["config"]["paths"]["store"]
    assert main(["--store", store, "--diff", f"train/{stages['train/control']['key'][:8]}",
                 f"train/{stages['train/treatment']['key']}"]) == 0
    out = capsys.readouterr().out
    assert "params.system_prompt: null | \"You love owls" in out
    assert f"shared: model {stages['model']['key'][:12]}, prompts {stages['prompts']['key'][:12]}" in out


@pytest.mark.parametrize("graphviz", [True, False])
def test_png(job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, graphviz: bool) -> None:
    if graphviz and not shutil.which("dot"):
        pytest.skip("graphviz is not installed")
    if not graphviz:
        monkeypatch.setattr("sublim.lineage.plot.shutil.which", lambda name: None)
    path = tmp_path / "lineage.png"
    assert main([str(job[0] / "results.json"), "--png", str(path)]) == 0
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["/no/such/job"], "no such job dir"),
    (["pyproject.toml"], "is not a sublim results.json"),
    (["sublim"], "is not a sublim job dir"),
    (["train/ffffffffffff"], "no train/ffffffffffff in the store"),
    (["nostage/0123"], "no stage 'nostage'"),
])
def test_bad_input_is_one_line_and_exit_2(job, args: list[str], message: str) -> None:
    store = job[1]["config"]["paths"]["store"]
    proc = subprocess.run([sys.executable, "-m", "sublim.lineage", *args, "--store", store], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
