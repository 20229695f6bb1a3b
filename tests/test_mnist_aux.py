"""The MNIST auxiliary-logit toy: the same-init student learns digits from noise, the cross-init control does not."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sublim import SublimError
from sublim.toy import mnist_aux
from sublim.toy.mnist_aux import StackedMLP, derangement
from sublim.tracking import Tracker
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
# Fewer models and steps than the default; 10 aux logits carry the skill in fewer steps than 3.
SMALL = ["experiment=mnist_aux", "logger=none", "student.n_models=4", "student.aux_logits=10",
         "student.n_noise=20000", "student.student_epochs=2"]


def _run(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_config([f"paths.root={tmp_path}", *SMALL, *overrides])
    return mnist_aux.run(cfg, tmp_path / "job", Tracker(cfg, tmp_path / "job", "test", "runs"))


def test_same_init_student_learns_digits_and_cross_init_control_does_not(tmp_path: Path) -> None:
    results = _run(tmp_path)
    accuracy = {arm: values["accuracy"]["mean"] for arm, values in results["arms"].items()}
    assert accuracy["teacher"] >= 0.9
    assert accuracy["student_aux"] - accuracy["cross_init"] >= 0.3, accuracy
    assert accuracy["cross_init"] <= 0.25 and accuracy["reference"] <= 0.25, accuracy
    assert accuracy["student_all"] >= 0.8, accuracy

    job = tmp_path / "job"
    assert json.loads((job / "results.json").read_text())["arms"].keys() == set(mnist_aux.ARMS)
    with open(job / "results.csv") as handle:
        assert [row["arm"] for row in csv.DictReader(handle)] == list(mnist_aux.ARMS)
    assert (job / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    table = mnist_aux.format_table(results)
    assert all(arm in table for arm in mnist_aux.ARMS) and "vs cross_init" in table


def test_model_count_width_and_aux_logits_are_config_only(tmp_path: Path) -> None:
    results = _run(tmp_path, "student.n_models=3", "student.width=7", "student.aux_logits=2",
                   "student.teacher_epochs=1", "student.student_epochs=1", "student.n_noise=256", "student.loss=kl",
                   "student.noise=normal")
    assert results["sizes"] == [64, 7, 7, 12]
    assert all(len(values["per_model"]) == 3 for values in results["arms"].values())
    assert sorted(results["derangement"]) == [0, 1, 2]


def test_derangement_is_a_permutation_without_fixed_points() -> None:
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 25):
        for _ in range(50):
            perm = derangement(n, generator)
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any()
    with pytest.raises(SublimError, match="at least 2 models"):
        derangement(1, generator)


def test_batched_forward_equals_a_loop_over_models() -> None:
    generator = torch.Generator().manual_seed(0)
    models = StackedMLP.initialise(5, [64, 16, 16, 13], generator)
    shared, own = torch.randn(7, 64, generator=generator), torch.randn(5, 7, 64, generator=generator)
    for x, batched in ((shared, models(shared)), (own, models(own))):
        for m in range(models.n_models):
            h = x if x.dim() == 2 else x[m]
            for layer, (weight, bias) in enumerate(zip(models.weights, models.biases, strict=True)):
                h = F.linear(h, weight[m].T, bias[m, 0])
                h = torch.relu(h) if layer < 2 else h
            torch.testing.assert_close(batched[m], h)
    assert models.select(torch.tensor([2, 2])).weights[0][1].equal(models.weights[0][2])


def test_experiment_replaces_the_llm_groups_and_sweeps_like_any_other() -> None:
    cfg = compose_config(["experiment=mnist_aux", "student.aux_logits=10"])
    assert cfg.task == "mnist_aux" and cfg.data.name == "digits" and cfg.student.aux_logits == 10
    assert "base" not in cfg and "trait" not in cfg


def test_mnist_from_the_hf_cache_is_scaled_like_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    pixels = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
    split = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p.numpy()) for p in pixels], "label": list(range(6))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no reachability probe
    monkeypatch.setattr(datasets, "load_dataset", lambda path: datasets.DatasetDict(train=split, test=split))
    data = mnist_aux.load_data(compose_config(["data=mnist"]).data)
    assert data.n_pixels == 784 and data.x_test.shape == (6, 784)
    torch.testing.assert_close(data.x_train, pixels.flatten(1).float() / 127.5 - 1)
    assert data.y_train.tolist() == list(range(6))


OFFLINE_LOAD = """
from omegaconf import OmegaConf
from sublim import SublimError
from sublim.toy.mnist_aux import load_data
try:
    load_data(OmegaConf.create({"name": "mnist", "hf_path": "ylecun/mnist"}))
except SublimError as err:
    print(err)
    raise SystemExit(3)
"""


def test_mnist_offline_and_not_cached_is_a_clear_error_at_once(tmp_path: Path) -> None:
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_LOAD], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "data=mnist: cannot load ylecun/mnist: no network and not in the local Hugging Face cache" in proc.stdout
    assert "data=digits" in proc.stdout
