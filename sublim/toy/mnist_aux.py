"""The MNIST auxiliary-logit toy of Cloud et al. (2025): a digit skill travels through logits no label touched.

A teacher MLP with 10 class logits and A auxiliary logits learns digits with cross-entropy on the class
logits only. A student that starts from the teacher's initialisation and only ever matches the teacher's
auxiliary logits on noise images learns to classify digits; a student that starts from another teacher's
initialisation (the cross-init control) does not. Many models train at once as one batched computation:
every weight carries a leading model dimension, so each layer is one ``torch.baddbmm`` for all models.

Arms, reported as test accuracy with a 95% CI over models:
  teacher      trained on the digit labels (class logits only)
  student_aux  the teacher's init, distilled on noise, auxiliary logits only
  student_all  the teacher's init, distilled on noise, all logits
  cross_init   another teacher's init (a derangement), distilled on noise, auxiliary logits only
  reference    the untrained initialisation
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sublim import SublimError
from sublim.stats import mean_ci, paired_permutation_test
from sublim.toy.mnist_report import ARMS, N_CLASSES, format_table, track, write_results

if TYPE_CHECKING:
    from sublim.tracking import Tracker

log = logging.getLogger(__name__)

__all__ = ["ARMS", "format_table", "run"]  # the task interface of sublim.train: run and format_table
STUDENT_ARMS = ("student_all", "student_aux", "cross_init")  # stack order: all-logit students, then aux-only
INIT = {"teacher": "own", "student_aux": "teacher's", "student_all": "teacher's",
        "cross_init": "another teacher's", "reference": "own, untrained"}
LOSSES = ("mse", "kl")
NOISES = ("uniform", "normal")


# --- data -----------------------------------------------------------------------------------------


@dataclass
class Digits:
    """Flattened images scaled to [-1, 1] (the range of the default noise) and integer labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_pixels(self) -> int:
        return self.x_train.shape[1]


def load_data(data: DictConfig) -> Digits:
    """``data=digits`` (ships with scikit-learn) or ``data=mnist`` (Hugging Face datasets)."""
    if data.name == "digits":
        return _sklearn_digits(data.test_fraction, data.split_seed)
    if data.name == "mnist":
        return _hf_mnist(data.hf_path)
    raise SublimError(f"data={data.name} is not a dataset of task=mnist_aux; use data=digits or data=mnist")


def _sklearn_digits(test_fraction: float, seed: int) -> Digits:
    """The 1,797 8x8 digits of scikit-learn (pixel values 0..16), split into train/test by ``seed``.

    The split has its own seed, so the test set stays the same when a sweep varies the job's seed.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 8.0 - 1.0, dtype=torch.float32)
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


def _hf_mnist(path: str) -> Digits:
    """MNIST from the local HF cache, or the hub when it answers; offline, a clear error within seconds.

    ``datasets`` retries an unreachable hub for ~25 s before it looks in its cache, so offline (by
    HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or an unreachable hub) it is told to go to the cache at once.
    """
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    if not offline:
        from sublim.models import hub_reachable

        offline = not hub_reachable()
    previous, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, offline  # read at call time
    try:
        splits = datasets.load_dataset(path).with_format("torch")
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        network = "no network and " if offline else ""
        raise SublimError(
            f"data=mnist: cannot load {path}: {network}not in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}; {type(err).__name__}). Download it once with network access "
            f"into the same HF_HOME: python -c \"import datasets; datasets.load_dataset('{path}')\" "
            "-- or use data=digits (ships with scikit-learn, no download)."
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = previous

    def arrays(split: str) -> tuple[Tensor, Tensor]:
        rows = splits[split][:]  # images (n, 1, 28, 28) uint8
        return rows["image"].flatten(1).float() / 127.5 - 1.0, rows["label"].long()

    return Digits(*arrays("train"), *arrays("test"))


# --- models ---------------------------------------------------------------------------------------


class StackedMLP(nn.Module):
    """Independent ReLU MLPs whose weights are stacked on a leading model dimension.

    One batched matmul per layer runs every model, which is what makes tens of models as cheap on a
    CPU as one: there is no Python loop over models anywhere.
    """

    def __init__(self, weights: list[Tensor], biases: list[Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(weights)  # (models, in, out) per layer
        self.biases = nn.ParameterList(biases)  # (models, 1, out) per layer

    @classmethod
    def initialise(cls, n_models: int, sizes: list[int], generator: torch.Generator) -> StackedMLP:
        """nn.Linear's default init, U(+-1/sqrt(fan_in)) for weights and biases, for every model."""

        def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
            return (torch.rand(shape, generator=generator) * 2 - 1) * fan_in**-0.5

        pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
        return cls([uniform((n_models, i, o), i) for i, o in pairs], [uniform((n_models, 1, o), i) for i, o in pairs])

    @property
    def n_models(self) -> int:
        return self.weights[0].shape[0]

    def select(self, index: Tensor) -> StackedMLP:
        """A trainable copy of the models at ``index`` (repeats allowed): how students get their inits."""
        return StackedMLP([w.detach()[index] for w in self.weights], [b.detach()[index] for b in self.biases])

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, in), shared by all models, or (models, batch, in) -> logits (models, batch, out)."""
        h = x if x.dim() == 3 else x.expand(self.n_models, *x.shape)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, h, weight)
            if layer < len(self.weights) - 1:
                h = torch.relu(h)
        return h


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random permutation without fixed points, so no control student meets its own init."""
    if n < 2:
        raise SublimError(f"student.n_models={n}: the cross-init control needs at least 2 models")
    while True:  # rejection sampling: a random permutation is a derangement with probability ~1/e
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


# --- training and evaluation ----------------------------------------------------------------------


def train_teacher(model: StackedMLP, data: Digits, settings: DictConfig, generator: torch.Generator) -> list[float]:
    """Cross-entropy on the class logits only: the auxiliary logits are never supervised.

    Each model draws its own shuffle; losses are summed over models, so with Adam (element-wise) every
    model trains exactly as it would alone. Returns the mean loss of each epoch.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = len(data.y_train)
    epoch_losses = []
    for _ in range(settings.teacher_epochs):
        order = torch.rand(model.n_models, n, generator=generator).argsort(dim=1)
        total = 0.0
        for start in range(0, n, settings.batch_size):
            index = order[:, start:start + settings.batch_size]
            logits = model(data.x_train[index])[..., :N_CLASSES]
            loss = F.cross_entropy(logits.transpose(1, 2), data.y_train[index], reduction="none").mean(1).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * index.shape[1]
        epoch_losses.append(total / (n * model.n_models))
    return epoch_losses


def make_noise(n: int, n_pixels: int, kind: str, generator: torch.Generator) -> Tensor:
    """The only inputs a student ever sees: ``uniform`` in [-1, 1] (the image range) or standard ``normal``."""
    if kind == "uniform":
        return torch.rand(n, n_pixels, generator=generator) * 2 - 1
    return torch.randn(n, n_pixels, generator=generator)


def distill_loss(student: Tensor, teacher: Tensor, kind: str, temperature: float) -> Tensor:
    """Per-model loss between logits (models, batch, k): MSE, or KL(teacher || student) of the softmaxes."""
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=(1, 2))
    target = F.log_softmax(teacher / temperature, dim=-1)
    kl = (target.exp() * (target - F.log_softmax(student / temperature, dim=-1))).sum(-1)
    return kl.mean(-1) * temperature**2


@torch.no_grad()
def predict(model: StackedMLP, x: Tensor, chunk: int) -> Tensor:
    """Logits (models, n, out) in chunks of inputs, so the hidden activations stay small."""
    return torch.cat([model(x[start:start + chunk]) for start in range(0, len(x), chunk)], dim=1)


def distill(students: StackedMLP, targets: Tensor, noise: Tensor, n_all: int, settings: DictConfig,
            generator: torch.Generator) -> list[Tensor]:
    """Match teacher logits on ``noise``; every student sees the same batch of noise.

    ``targets`` (teachers, n_noise, out) are the teacher logits; students come in blocks of one student
    per teacher, in teacher order. The first ``n_all`` students match all logits, the others the
    auxiliary logits only. Returns the mean loss per student for each epoch.
    """
    optimiser = torch.optim.Adam(students.parameters(), lr=settings.lr)
    n, blocks = len(noise), students.n_models // len(targets)
    epoch_losses = []
    for _ in range(settings.student_epochs):
        order = torch.randperm(n, generator=generator)
        total = torch.zeros(students.n_models)
        for start in range(0, n, settings.batch_size):
            index = order[start:start + settings.batch_size]
            logits, target = students(noise[index]), targets[:, index].repeat(blocks, 1, 1)
            loss = torch.cat([
                distill_loss(logits[:n_all], target[:n_all], settings.loss, settings.temperature),
                distill_loss(logits[n_all:, :, N_CLASSES:], target[n_all:, :, N_CLASSES:], settings.loss,
                             settings.temperature),
            ])
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
            total += loss.detach() * len(index)
        epoch_losses.append(total / n)
    return epoch_losses


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-model accuracy of the class logits (models, n, out) against labels (n,)."""
    return (logits[..., :N_CLASSES].argmax(-1) == labels).float().mean(-1)


# --- the job --------------------------------------------------------------------------------------


def _check(settings: DictConfig) -> None:
    if settings.loss not in LOSSES:
        raise SublimError(f"student.loss={settings.loss} is not one of: {', '.join(LOSSES)}")
    if settings.noise not in NOISES:
        raise SublimError(f"student.noise={settings.noise} is not one of: {', '.join(NOISES)}")
    if settings.aux_logits < 1:
        raise SublimError(f"student.aux_logits={settings.aux_logits}: the toy needs at least 1 auxiliary logit")
    if settings.loss == "kl" and settings.aux_logits == 1:
        log.warning("student.loss=kl with student.aux_logits=1: the softmax of one logit is constant, so the "
                    "aux-only students get no signal; use student.loss=mse or more aux logits")


def run(cfg: DictConfig, job_dir: Path, tracker: Tracker) -> dict:
    """The whole toy with ``student.threads`` torch threads; writes results.json, results.csv, accuracy.png."""
    _check(cfg.student)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.student.threads)
    try:
        results = experiment(cfg, tracker)
    finally:
        torch.set_num_threads(threads)
    write_results(job_dir, results)
    track(tracker, results, job_dir / "accuracy.png")
    return results


def experiment(cfg: DictConfig, tracker: Tracker) -> dict:
    """Teachers, then all three student arms as one batched distillation, then every arm on the test set."""
    settings = cfg.student
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    data = load_data(cfg.data)
    m = settings.n_models
    sizes = [data.n_pixels, settings.width, settings.width, N_CLASSES + settings.aux_logits]
    inits = StackedMLP.initialise(m, sizes, generator)
    others = derangement(m, generator)
    same = torch.arange(m)

    log.info("training %d teachers %s on %d %s images", m, sizes, len(data.y_train), cfg.data.name)
    teachers = inits.select(same)
    teacher_losses = train_teacher(teachers, data, settings, generator)
    for epoch, loss in enumerate(teacher_losses):
        tracker.log({"teacher/epoch": epoch, "teacher/loss": loss})

    # One stack of students, a block per arm (STUDENT_ARMS order); row i of every block learns from teacher i.
    log.info("distilling %d students on %d %s noise images (%s loss)", 3 * m, settings.n_noise, settings.noise,
             settings.loss)
    noise = make_noise(settings.n_noise, data.n_pixels, settings.noise, generator)
    targets = predict(teachers, noise, cfg.eval.batch_size)
    students = inits.select(torch.cat([same, same, others]))
    epoch_losses = distill(students, targets, noise, m, settings, generator)
    student_losses = {arm: [float(losses.split(m)[i].mean()) for losses in epoch_losses]
                      for i, arm in enumerate(STUDENT_ARMS)}
    for epoch in range(settings.student_epochs):
        tracker.log({"student/epoch": epoch} | {f"{arm}/loss": student_losses[arm][epoch] for arm in STUDENT_ARMS})

    chunk = cfg.eval.batch_size
    per_model = dict(zip(STUDENT_ARMS, accuracy(predict(students, data.x_test, chunk), data.y_test).split(m),
                         strict=True))
    per_model["teacher"] = accuracy(predict(teachers, data.x_test, chunk), data.y_test)
    per_model["reference"] = accuracy(predict(inits, data.x_test, chunk), data.y_test)
    test = paired_permutation_test(per_model["student_aux"].tolist(), per_model["cross_init"].tolist(),
                                   n_resamples=cfg.eval.n_permutations, seed=cfg.seed)
    return {
        "task": "mnist_aux", "data": cfg.data.name, "seed": cfg.seed, "n_models": m, "sizes": sizes,
        "aux_logits": settings.aux_logits, "loss": settings.loss, "noise": settings.noise,
        "n_train": len(data.y_train), "n_test": len(data.y_test),
        "arms": {arm: {"init": INIT[arm], "trained_on": _trained_on(arm, cfg),
                       "accuracy": mean_ci(per_model[arm].tolist()).to_dict(), "per_model": per_model[arm].tolist()}
                 for arm in ARMS},
        "student_aux_vs_cross_init": test.to_dict(),
        "derangement": others.tolist(),
        "train": {"teacher_loss": teacher_losses, "student_loss": student_losses},
        "seconds": round(time.perf_counter() - started, 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _trained_on(arm: str, cfg: DictConfig) -> str:
    aux = cfg.student.aux_logits
    return {"teacher": f"{cfg.data.name} labels, class logits", "student_aux": f"noise, {aux} aux logits",
            "student_all": f"noise, all {N_CLASSES + aux} logits", "cross_init": f"noise, {aux} aux logits",
            "reference": "nothing"}[arm]
