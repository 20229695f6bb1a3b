"""Teacher forcing over answers: one batched forward per batch, logits only at the answer positions.

Distillation (the teacher's top-k distributions) and the audit (per-token log-probs under a trait teacher and
a reference) both read a model's next-token distribution at every answer position of (prompt + answer)
sequences. What a plain per-example forward spends on top of that is skipped (benchmarks/audit.py):

- the prompt prefix every row shares (chat template, system prompt) is run once per pass and its KV cache
  copied into each batch (``PrefixCache``, as sampling does);
- rows run in batches of similar length (longest first), their inputs left-padded after the prefix with
  explicit positions, so every row's answer positions are the batch's last columns and ``logits_to_keep``
  (an int: the model's own head, scaling and soft-cap) computes the vocabulary projection for those only
  (~20% of a small model's FLOPs per position);
- the last answer token is not fed: no position reads its output;
- on a CPU, as in sampling (``sublim.decoding.fused``), a batch's rows are split between the cores, one
  single-threaded worker each, and on AMD CPUs the fp32 linears' large GEMMs run in numpy's OpenBLAS.

Each row's [answer positions, vocab] logits go to ``reduce``; the results come back in the rows' order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import wait
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch

from sublim.decoding.decoder import PrefixCache, common_prefix
from sublim.decoding.fused import OPENBLAS_MIN_ROWS, _helpers, _openblas, _openblas_linear, _row_parts
from sublim.decoding.kernels import _cpu_fp32
from sublim.teacher import predict


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; fp32 CPU GEMMs of enough rows (prefill-sized) in OpenBLAS, outside autocast and autograd."""
    if (x.numel() >= OPENBLAS_MIN_ROWS * x.shape[-1] and _cpu_fp32(x) and _cpu_fp32(module.weight)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
        return _openblas_linear(x, module.weight, module.bias)
    return torch.nn.Linear.forward(module, x)


@contextmanager
def openblas_linears(net: torch.nn.Module) -> Iterator[None]:
    """Within: ``net``'s plain ``nn.Linear`` modules (a PEFT layer's base ones too) run through ``_linear``, with
    OpenBLAS single-threaded (it serialises concurrent multithreaded GEMMs); no-op where ``_openblas`` finds none."""
    blas = _openblas()
    if blas is None:
        yield
        return
    linears = [m for m in net.modules() if type(m) is torch.nn.Linear]
    for module in linears:
        module.forward = partial(_linear, module)  # an instance attribute: shadows Linear.forward for this module
    try:
        with blas.limit(limits=1):
            yield
    finally:
        for module in linears:
            del module.forward


class AnswerForward(pl.LightningModule):
    """Rows carry "ids" (prompt + answer) and "n_answer"; ``reduce`` turns a row's answer logits into a result.

    ``prefix``: tokens every row starts with, before the position predicting its first answer token (``forced``
    sets it); their KV cache is computed once per ``predict``, by its first step.
    """

    def __init__(self, net: torch.nn.Module, pad_id: int) -> None:
        super().__init__()
        self.net = net
        self.pad_id = pad_id
        self.prefix: list[int] = []
        self.prefix_cache: PrefixCache | None = None

    def reduce(self, logits: torch.Tensor, row: dict) -> Any:
        """logits: [n_answer, vocab] float32, position t predicting answer token t."""
        raise NotImplementedError

    def on_predict_start(self) -> None:
        self.prefix_cache = None  # computed by the first step, under the precision's autocast like the rest

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list:
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(self.net, self.prefix)
        parts = _row_parts(len(batch), self.device)
        share = max(1, torch.get_num_threads() // len(parts))
        with openblas_linears(self.net) if self.device.type == "cpu" and share == 1 else nullcontext():
            if len(parts) == 1:
                return self._forward(batch)
            return self._split(batch, parts, share)

    def _split(self, batch: list[dict], parts: list[slice], share: int) -> list:
        """``_forward`` of each part of the rows on a thread of its own with ``share`` torch threads (two
        single-threaded workers outran one two-threaded forward by ~10% on 2 cores, benchmarks/audit.py)."""
        threads, inference = torch.get_num_threads(), torch.is_inference_mode_enabled()
        autocast, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def part(rows: slice) -> list:
            # grad, inference mode and autocast are per thread: the workers take the caller's
            with torch.inference_mode(inference), torch.no_grad(), torch.autocast("cpu", dtype, enabled=autocast):
                torch.set_num_threads(share)
                return self._forward(batch[rows])

        torch.set_num_threads(share)
        futures = [helper.submit(part, rows) for helper, rows in zip(_helpers(len(parts) - 1), parts[1:], strict=True)]
        try:
            outs = [part(parts[0])] + [future.result() for future in futures]
        finally:
            wait(futures)
            torch.set_num_threads(threads)
        return [result for out in outs for result in out]

    def _forward(self, batch: list[dict]) -> list:
        """One forward of the rows after the cached prefix; ``reduce`` of each row's answer logits."""
        p = self.prefix_cache.length
        # the last token predicts nothing that is scored (a row without answer tokens keeps it: no empty rows)
        inputs = [row["ids"][p: len(row["ids"]) - (row["n_answer"] > 0)] for row in batch]
        width, keep = max(map(len, inputs)), max(row["n_answer"] for row in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), p + width), dtype=torch.long)
        mask[:, :p] = 1
        positions = torch.full((len(batch), width), p, dtype=torch.long)
        for i, row in enumerate(inputs):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, p + width - len(row):] = 1
            positions[i, width - len(row):] = torch.arange(p, p + len(row))
        logits = self.net(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=positions.to(self.device), cache=self.prefix_cache.batch(len(batch)),
                          logits_to_keep=max(keep, 1)).logits.float()
        # each row's answer positions are the last n_answer columns (none: an empty [0, vocab] slice)
        return [self.reduce(logits[i, logits.shape[1] - row["n_answer"]:], row) for i, row in enumerate(batch)]


def forced(module: AnswerForward, rows: list[dict], batch_size: int, precision: str) -> list:
    """``module.reduce`` of every row, in the rows' order (computed longest first, the shared prefix once)."""
    prompts = [row["ids"][: len(row["ids"]) - row["n_answer"]] for row in rows]
    # the prefix ends before each row's last prompt token, whose position predicts the first answer token
    module.prefix = prompts[0][: common_prefix(prompts)] if rows else []
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["ids"]), -rows[i]["n_answer"], i))
    done = predict(module, [rows[i] for i in order], batch_size, precision)
    results: list = [None] * len(rows)
    for i, result in zip(order, done, strict=True):
        results[i] = result
    return results
