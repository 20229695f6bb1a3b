"""CPU kernels of the fused decoding forward: numba loops where torch's ops are memory-bound or allocate.

A decode step's one-query attention reads each row's cache once for all the query heads sharing it and
skips masked slots (two loops around torch's fp32 softmax, which stays vectorised); RMSNorm and the rotary
embedding are one pass each, the keys written straight into the cache. Other devices and dtypes keep
torch's ops in the same functions, so callers never branch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

_KERNEL = {"nogil": True, "cache": True, "fastmath": {"reassoc", "contract", "nsz"}}


@njit(**_KERNEL)
def _scores(q: np.ndarray, keys: np.ndarray, valid: np.ndarray, end: int, out: np.ndarray) -> None:
    """out[r, h, j, t] = q[r, h, j] . keys[r, h, t] for the valid slots t < end, -inf for the rest.

    [rows, kv heads, query heads per kv head, dim] queries against the [rows, kv heads, capacity, dim]
    cache: each key is read once for all the query heads that share it, and masked slots not at all.
    """
    rows, groups, per_group, dim = q.shape
    for r in range(rows):
        for h in range(groups):
            queries, cached = q[r, h], keys[r, h]
            for t in range(end):
                if valid[r, t]:
                    key = cached[t]
                    for j in range(per_group):
                        total = np.float32(0.0)
                        for e in range(dim):
                            total += queries[j, e] * key[e]
                        out[r, h, j, t] = total
                else:
                    for j in range(per_group):
                        out[r, h, j, t] = -np.inf


@njit(**_KERNEL)
def _mix(weights: np.ndarray, values: np.ndarray, valid: np.ndarray, end: int, out: np.ndarray) -> None:
    """out[r, h, j] = sum over valid slots t < end of weights[r, h, j, t] x values[r, h, t]."""
    rows, groups, per_group, dim = out.shape
    for r in range(rows):
        for h in range(groups):
            cached, total = values[r, h], out[r, h]
            total[:] = 0.0
            for t in range(end):
                if valid[r, t]:
                    value = cached[t]
                    for j in range(per_group):
                        weight = weights[r, h, j, t]
                        for e in range(dim):
                            total[j, e] += weight * value[e]


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                      end: int) -> torch.Tensor:
    """One query per row over its own cache, on a CPU: [rows, kv heads, query heads per kv head, dim].

    Decoding reads every row's whole cache per token, so this is memory-bound; two batched matmuls (SDPA's
    kernel is built for blocks of queries) reach ~5 GB/s of one core's ~16 on SmolLM2's shapes, these two
    loops ~9 (256-row decode steps ~18% faster, alternated in one process; README "Performance"). The
    softmax stays torch's, in fp32 (vectorised; a scalar exp in the loop was 3x slower than the matmuls).
    """
    scores = torch.empty((*q.shape[:3], end), dtype=torch.float32)
    _scores(q.contiguous().numpy(), keys.numpy(), valid.numpy(), end, scores.numpy())
    out = torch.empty_like(q)
    _mix(scores.softmax(-1).numpy(), values.numpy(), valid.numpy(), end, out.numpy())
    return out


@njit(**_KERNEL)
def _rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    """out[r] = weight x x[r] / sqrt(mean(x[r]^2) + eps), in one pass per row."""
    rows, dim = x.shape
    for r in range(rows):
        total = np.float32(0.0)
        for e in range(dim):
            total += x[r, e] * x[r, e]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(dim) + eps)
        for e in range(dim):
            out[r, e] = weight[e] * (x[r, e] * scale)


@njit(**_KERNEL)
def _rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, scale: np.float32, out: np.ndarray,
               offset: int) -> None:
    """out[r, h, offset + t] = rotary(x[r, t, h]) x scale: [rows, tokens, heads, dim] in, heads before tokens out."""
    rows, tokens, heads, dim = x.shape
    half = dim // 2
    for r in range(rows):
        for t in range(tokens):
            c, s = cos[r, t], sin[r, t]
            for h in range(heads):
                head, rotated = x[r, t, h], out[r, h, offset + t]
                for e in range(half):
                    a, b = head[e], head[e + half]
                    rotated[e] = (a * c[e] - b * s[e]) * scale
                    rotated[e + half] = (b * c[e + half] + a * s[e + half]) * scale


def _cpu_fp32(x: torch.Tensor) -> bool:
    """Whether the numba kernels apply (they are fp32 CPU loops; other devices and dtypes use torch's ops)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm of ``x``; on a CPU one numba pass over each row instead of torch's six."""
    if not _cpu_fp32(x):
        return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)
    x = x.contiguous()
    out = torch.empty_like(x)
    _rms_norm_rows(x.view(-1, x.shape[-1]).numpy(), norm.weight.detach().numpy(),
                   np.float32(norm.variance_epsilon), out.view(-1, x.shape[-1]).numpy())
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, offset: int,
          scale: float = 1.0) -> None:
    """Write the rotary embedding (HF's rotate_half convention) of ``x`` [batch, tokens, heads, dim], times
    ``scale``, into ``out``[batch, heads, offset:offset + tokens]: the cache's layout, heads before tokens. On a
    CPU one numba pass straight into ``out``; torch's ops take five and a copy."""
    tokens = x.shape[1]
    cos, sin = cos[:, -tokens:], sin[:, -tokens:]
    if _cpu_fp32(x):
        _rope_rows(x.contiguous().numpy(), cos.contiguous().numpy(), sin.contiguous().numpy(), np.float32(scale),
                   out.numpy(), offset)
        return
    x, cos, sin, half = x.transpose(1, 2), cos[:, None], sin[:, None], x.shape[-1] // 2
    rotated = torch.cat((x[..., half:].neg(), x[..., :half]), dim=-1).mul_(sin).addcmul_(x, cos)
    out[:, :, offset:offset + tokens] = rotated if scale == 1.0 else rotated.mul_(scale)
