"""The MNIST auxiliary-logit toy: sublim's stacked (batched) MLPs vs a Python loop over nn.Sequential models.

    python benchmarks/mnist_aux.py                       # experiment=mnist_aux's 10 teachers x 10 epochs, 3 rounds

Both sides train the same number of teachers (in-W-W-(10+aux) ReLU MLPs) on the same digits with
Adam, the same batch size and epochs, cross-entropy on the class logits only. The baseline is what one
writes per model: an ``nn.Sequential`` and its own optimiser, trained one after another. Reported:
model-epochs per second.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import alternate, config, median, table
from torch import nn

from sublim.toy.mnist_aux import StackedMLP, load_data, train_teacher
from sublim.toy.mnist_report import N_CLASSES


def loop(data, settings, sizes: list[int], generator: torch.Generator) -> dict:
    for _ in range(settings.n_models):
        layers = [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        n = len(data.y_train)
        for _ in range(settings.teacher_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, settings.batch_size):
                index = order[start:start + settings.batch_size]
                loss = F.cross_entropy(model(data.x_train[index])[:, :N_CLASSES], data.y_train[index])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    return {}


def batched(data, settings, sizes: list[int], generator: torch.Generator) -> dict:
    train_teacher(StackedMLP.initialise(settings.n_models, sizes, generator), data, settings, generator)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. student.n_models=40")
    args = parser.parse_args()

    cfg = config("experiment=mnist_aux", *args.overrides)
    settings = cfg.student
    torch.set_num_threads(settings.threads)
    data = load_data(cfg.data)
    sizes = [data.n_pixels, settings.width, settings.width, N_CLASSES + settings.aux_logits]
    print(f"{settings.n_models} teachers {sizes}, {len(data.y_train)} {cfg.data.name} images x "
          f"{settings.teacher_epochs} epochs, batch {settings.batch_size}, {settings.threads} thread(s)", flush=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    results = alternate({"python loop": lambda: loop(data, settings, sizes, generator),
                         "sublim (stacked)": lambda: batched(data, settings, sizes, generator)}, args.repeats)
    work = settings.n_models * settings.teacher_epochs
    lines = []
    base = work / median(results["python loop"], "seconds")
    for name, values in results.items():
        seconds = median(values, "seconds")
        lines.append([name, f"{seconds:.2f}", f"{work / seconds:.2f}", f"{work / seconds / base:.2f}x"])
    print()
    print(table(["method", "seconds", "model-epochs/s", "vs loop"], lines))


if __name__ == "__main__":
    main()
