"""Loading a model for a stage's compute: a base, with a trained adapter merged in when there is one."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from sublim import models
from sublim.store import Artifact
from sublim.student import load_student
from sublim.training import ADAPTER_DIR


def load_model(model: Artifact, adapter: Artifact | None,
               base: DictConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A base (a student's, or a finetuned teacher's) with its adapter merged."""
    net, tokenizer = models.load(model, base)
    if adapter is not None:
        net = load_student(net, adapter.path / ADAPTER_DIR)
    return net, tokenizer
