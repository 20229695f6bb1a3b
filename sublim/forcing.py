"""Teacher forcing over answers: one batched forward per batch, logits only at the answer positions.

Distillation (the teacher's top-k distributions) and the audit (per-token log-probs under a trait teacher and
a reference) both read a model's next-token distribution at every answer position of (prompt + answer)
sequences. ``AnswerForward`` pads a batch, runs the network once with ``logits_to_keep`` covering the
answer span only (the vocabulary projection is ~20% of a small model's FLOPs per position), and hands each
row's [answer positions, vocab] logits to ``reduce``. ``forced`` batches rows of similar length (longest first,
little padding) through a Lightning ``predict`` and returns the results in the rows' order.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from sublim.teacher import predict


class AnswerForward(pl.LightningModule):
    """Rows carry "ids" (prompt + answer) and "n_answer"; ``reduce`` turns a row's answer logits into a result."""

    def __init__(self, net: torch.nn.Module, pad_id: int) -> None:
        super().__init__()
        self.net = net
        self.pad_id = pad_id

    def reduce(self, logits: torch.Tensor, row: dict) -> Any:
        """logits: [n_answer, vocab] float32, position t predicting answer token t."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list:
        width = max(len(r["ids"]) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row["ids"])] = torch.tensor(row["ids"], device=self.device)
            mask[i, : len(row["ids"])] = 1
        first = min(len(r["ids"]) - r["n_answer"] for r in batch) - 1  # position predicting the first answer token
        keep = torch.arange(first, width - 1, device=self.device)
        logits = self.net(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        out = []
        for i, row in enumerate(batch):
            start = len(row["ids"]) - row["n_answer"] - 1 - first
            out.append(self.reduce(logits[i, start: start + row["n_answer"]], row))
        return out


def forced(module: AnswerForward, rows: list[dict], batch_size: int, precision: str) -> list:
    """``module.reduce`` of every row, in the rows' order (computed longest first)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
    done = predict(module, [rows[i] for i in order], batch_size, precision)
    results: list = [None] * len(rows)
    for i, result in zip(order, done, strict=True):
        results[i] = result
    return results
