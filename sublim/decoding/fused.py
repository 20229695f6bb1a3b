"""A batched decoding forward for Llama-family models (Llama, SmolLM2, Qwen2), built for CPU sampling.

HF's forward spends a decode step on more than the model's matmuls: its dynamic cache concatenates every
layer's keys and values onto a growing tensor (a copy of the whole cache per step), prefill repeats the
key/value heads for grouped-query attention, and each RMSNorm, rotary embedding and SiLU allocates fresh
tensors. Here the batch's KV cache is preallocated once (shared prompt prefix copied in, suffixes and
answers written in place), attention is SDPA's fused kernel on the key/value heads with the query heads
packed beside them, and the residual stream and MLP activations are updated in place. Prefill skips what
the next token does not need: a template opening that several prompts share is computed once for all of
them, and the last layer runs only its key/value projections for all but the last position. On a CPU each
forward's rows are split between threads, one per core, each running torch single-threaded (two GEMMs of
half the rows outrun one GEMM on two threads; on AMD CPUs prefill's GEMMs run in numpy's OpenBLAS), a decode
step's attention is a pair of numba loops that read each row's cache once for all the query heads sharing it
(memory-bound work), and RMSNorm and the rotary embedding are one numba pass each, the keys' written straight
into the cache. The projections are the model's own ``nn.Linear`` modules, so a PEFT model's LoRA adapters
apply unchanged.

The arithmetic is HF's (same weights, same order of operations up to float rounding): greedy tokens equal
``generate``'s and every step's logits equal the full forward's (tests/test_decoding.py). Other
architectures use the HF forward (``sublim.decoding.decoder``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from sublim.decoding.kernels import _cpu_fp32, _decode_attention, _rms_norm, _rope

FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# Rows x width of one prefill chunk: large enough for efficient matmuls, small enough to add little padding.
PREFILL_TOKENS = 4096
# On a CPU, each forward's rows are split between this many threads (at most torch's thread count), each
# running torch with its share of the threads. On 2 cores, two single-threaded MKL GEMMs on half the rows
# each beat one two-threaded GEMM (~155 vs ~125 GFLOP/s for prefill shapes), and the small elementwise
# ops skip OpenMP's fork and join: sampling runs ~15% faster (benchmarks/sampling.py, README).
CPU_WORKERS = 2
# GEMMs of at least this many rows (prefill) run in numpy's OpenBLAS when ``_openblas`` finds it on an AMD CPU and
# each worker is single-threaded. There OpenBLAS's Zen kernels ran prefill shapes ~8% faster than torch's MKL (77-80
# vs 63-73 GFLOP/s per core) and a 256-prompt sampling run ~5% faster; on decoding's few rows MKL was as fast or
# faster. OpenBLAS serialises concurrent multithreaded GEMMs, hence single-threaded workers only.
OPENBLAS_MIN_ROWS = 256
_helper_threads: list[ThreadPoolExecutor] = []  # one single-thread executor per helper, kept across forwards


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its Linear modules carry the adapters)."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def supported(net: torch.nn.Module) -> bool:
    """Whether ``net`` is a Llama-family model this forward reproduces (SiLU MLP, full attention)."""
    model = unwrap(net)
    if type(model).__name__ not in FAMILIES or model.config.hidden_act != "silu":
        return False
    return all(getattr(layer.self_attn, "sliding_window", None) is None for layer in model.model.layers)


@functools.cache
def _openblas(cpuinfo: str = "/proc/cpuinfo") -> ThreadpoolController | None:
    """numpy's OpenBLAS, where the CPU is AMD's (measured faster than MKL there, see ``OPENBLAS_MIN_ROWS``)."""
    try:
        with open(cpuinfo) as f:
            amd = "AuthenticAMD" in f.read()
    except OSError:  # not Linux: no measurement says OpenBLAS wins there
        return None
    blas = ThreadpoolController().select(internal_api="openblas")
    return blas if amd and blas.lib_controllers else None


def _openblas_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of fp32 CPU tensors without autograd, as one GEMM in numpy's OpenBLAS."""
    out = torch.from_numpy(x.reshape(-1, x.shape[-1]).numpy() @ weight.detach().numpy().T)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], -1)


def _row_parts(rows: int, device: torch.device) -> list[slice]:
    """Contiguous, near-equal row ranges, one per CPU worker (one range on other devices)."""
    parts = min(CPU_WORKERS, torch.get_num_threads(), rows) if device.type == "cpu" else 1
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _helpers(threads: int) -> list[ThreadPoolExecutor]:
    """``threads`` helper threads beside the caller's, kept across forwards, grown if a forward needs more.

    One executor per thread, not one pool: a pool hands a second part to a thread that already finished the
    first, so two parts could run one after the other.
    """
    while len(_helper_threads) < threads:
        _helper_threads.append(ThreadPoolExecutor(1, thread_name_prefix=f"sublim-fused-{len(_helper_threads)}"))
    return _helper_threads[:threads]


# Fast-math without nnan/ninf: the masked slots' scores are -inf. Reassociation lets the reductions vectorise.
class FusedBatch:
    """One batch being decoded: its preallocated KV cache, which key slots are real, the tokens to feed next.

    Rows are left-padded suffixes after a shared prefix; slot ``j`` of every row is the same step, so a step
    writes one column of the cache for all rows at once.
    """

    def __init__(self, net: torch.nn.Module, prefix: list[tuple[torch.Tensor, torch.Tensor]],
                 ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                 spans: Sequence[tuple[int, Sequence[int]]] = ()) -> None:
        model = unwrap(net).model
        self.net, self.model, self.prefix, self.spans = net, model, prefix, spans
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        rows, width = ids.shape
        self.filled = len(prefix[0][0][0, 0]) if prefix else 0
        capacity = self.filled + width + max_new_tokens
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        dtype, device = model.embed_tokens.weight.dtype, ids.device
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in model.layers]
        for keys, values, (prefix_keys, prefix_values) in zip(self.keys, self.values, prefix, strict=False):
            keys[:, :, : self.filled] = prefix_keys
            values[:, :, : self.filled] = prefix_values
        self.prefix_length = self.filled
        self.valid = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.valid[:, : valid.shape[1]] = valid
        self.ids, self.positions = ids, positions
        self.blas = _openblas() if _cpu_fp32(self.keys[0]) else None
        self.openblas = False  # set per forward by ``_run``

    def _mask(self, rows: slice, start: int, end: int) -> torch.Tensor:
        """Which keys each query sees: real keys up to its own slot (which it always sees).

        [rows, 1, groups x queries, keys] booleans for SDPA; for one fp32 query per row on a CPU (decoding,
        ``_decode_attention``), the rows' [rows, capacity] validity.
        """
        if end - start == 1 and _cpu_fp32(self.keys[0]):
            return self.valid[rows]
        keys = self.valid[rows, None, :end]
        if end - start > 1:
            slots = torch.arange(end, device=keys.device)
            queries = torch.arange(start, end, device=keys.device)[:, None]
            keys = (keys & (slots <= queries)) | (slots == queries)
        return keys.repeat(1, self.heads // self.kv_heads, 1)[:, None]

    def _linear(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)``; a plain fp32 ``nn.Linear`` on enough rows in OpenBLAS where ``_run`` chose it (never under
        autocast, whose bf16/fp16 matmuls numpy cannot run)."""
        if (self.openblas and type(module) is torch.nn.Linear and x.numel() >= OPENBLAS_MIN_ROWS * x.shape[-1]
                and not torch.is_grad_enabled() and _cpu_fp32(x) and _cpu_fp32(module.weight)
                and not torch.is_autocast_enabled(x.device.type)):
            return _openblas_linear(x, module.weight, module.bias)
        return module(x)

    def _attend(self, attn: torch.nn.Module, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int,
                rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Attention output of the positions in ``h`` (the last of the new slots) over the cache's first
        ``end`` slots of ``keys``/``values``."""
        n, queries = h.shape[:2]
        decode = mask.dim() == 2  # the decode kernel takes its queries scaled
        q = torch.empty((n, self.heads, queries, self.head_dim), dtype=h.dtype, device=h.device)
        _rope(self._linear(attn.q_proj, h).view(n, queries, self.heads, self.head_dim), *rotary, q, 0,
              attn.scaling if decode else 1.0)
        # the query heads of a key/value head side by side: no repeated keys and values
        q = q.view(n, self.kv_heads, -1, self.head_dim)
        if decode:
            out = _decode_attention(q, keys, values, mask, end)
        else:
            # SDPA's fused kernel computes the softmax in fp32 and never materialises the scores
            out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                 scale=attn.scaling)
        out = out.view(n, self.heads, queries, self.head_dim).transpose(1, 2).reshape(n, queries, -1)
        return self._linear(attn.o_proj, out)

    def _forward(self, rows: slice, ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``ids`` of ``rows`` into cache slots from ``start``; the last position's final-normed state."""
        n, tokens = ids.shape
        end = start + tokens
        x = self.model.embed_tokens(ids)
        rotary = self.model.rotary_emb(x, positions)
        mask = self._mask(rows, start, end)
        last = len(self.model.layers) - 1
        for i, (layer, keys, values) in enumerate(zip(self.model.layers, self.keys, self.values, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            keys, values = keys[rows], values[rows]
            h = _rms_norm(x, layer.input_layernorm)
            shape = (n, tokens, self.kv_heads, self.head_dim)
            _rope(self._linear(attn.k_proj, h).view(shape), *rotary, keys, start)
            values[:, :, start:end] = self._linear(attn.v_proj, h).view(shape).transpose(1, 2)
            if i == last and x.shape[1] > 1:
                # the last layer owes the other positions only their keys and values: the rest of it runs
                # for the position whose next token is drawn
                x, h, mask = x[:, -1:], h[:, -1:], self._mask(rows, end - 1, end)
            x.add_(self._attend(attn, h, keys, values, end, rotary, mask))
            h = _rms_norm(x, layer.post_attention_layernorm)
            gate = F.silu(self._linear(mlp.gate_proj, h), inplace=True).mul_(self._linear(mlp.up_proj, h))
            x.add_(self._linear(mlp.down_proj, gate))
        return _rms_norm(x[:, -1], self.model.norm)

    def _run(self, first: int, ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """``_forward`` of the rows from ``first`` on, split between the CPU workers (``CPU_WORKERS``).

        Every row's arithmetic is its own: the split changes which thread computes a row, and its result only
        as far as a GEMM rounds differently for another number of rows.
        """
        parts = _row_parts(len(ids), ids.device)
        share = max(1, torch.get_num_threads() // len(parts))
        self.openblas = self.blas is not None and share == 1
        with self.blas.limit(limits=1) if self.openblas else nullcontext():
            if len(parts) == 1:
                return self._forward(slice(first, first + len(ids)), ids, positions, start)
            return self._split(parts, share, first, ids, positions, start)

    def _split(self, parts: list[slice], share: int, first: int, ids: torch.Tensor, positions: torch.Tensor,
               start: int) -> torch.Tensor:
        """``_forward`` of each part of the rows on a thread of its own, with ``share`` torch threads."""
        helpers = _helpers(len(parts) - 1)
        threads, inference = torch.get_num_threads(), torch.is_inference_mode_enabled()

        def part(rows: slice) -> torch.Tensor:
            # grad and inference mode are per thread: the workers take the caller's
            with torch.inference_mode(inference), torch.no_grad():
                torch.set_num_threads(share)
                return self._forward(slice(first + rows.start, first + rows.stop), ids[rows], positions[rows],
                                     start)

        torch.set_num_threads(share)
        futures = [helper.submit(part, rows) for helper, rows in zip(helpers, parts[1:], strict=True)]
        try:
            outs = [part(parts[0])] + [future.result() for future in futures]
        finally:
            wait(futures)
            torch.set_num_threads(threads)
        return torch.cat(outs)

    @torch.no_grad()
    def hidden(self) -> torch.Tensor:
        """Feed the pending tokens; the final-normed hidden state of each row's last position."""
        if self.filled > self.prefix_length:
            out = self._run(0, self.ids, self.positions, self.filled)
            self.filled += 1
            return out
        return self._prefill()

    def _prefill(self) -> torch.Tensor:
        """Prefill the prompt suffixes: each span's shared opening once, then the rest of every row.

        The rest is prefilled in chunks of consecutive rows, each only as wide as its longest remainder:
        rows sorted by what is left (``Decoder.generate`` does) then carry almost no padding.
        """
        width = self.ids.shape[1]
        lengths = self.valid[:, self.filled:].sum(1).tolist()
        left = list(lengths)
        for shared, rows in self.spans:
            for row in rows:
                left[row] -= shared
        chunks, first = [], 0
        while first < len(left):
            last, wide = first, left[first]
            while last + 1 < len(left) and (last + 2 - first) * max(wide, left[last + 1]) <= PREFILL_TOKENS:
                last += 1
                wide = max(wide, left[last])
            chunks.append((slice(first, last + 1), width - wide))
            first = last + 1
        # slots left of a narrow chunk are masked, but a masked slot's value still meets a 0 weight in the
        # attention, and 0 x (inf or NaN left in the memory by torch.empty) is NaN
        for rows, cut in chunks:
            for cache in (*self.keys, *self.values) if cut else ():
                cache[rows, :, self.filled:self.filled + cut] = 0
        if self.spans:
            self._prefill_openings(lengths)
        outs = [self._run(rows.start, self.ids[rows, cut:], self.positions[rows, cut:], self.filled + cut)
                for rows, cut in chunks]
        self.filled += width
        return torch.cat(outs)

    def _prefill_openings(self, lengths: list[int]) -> None:
        """Prefill each span's opening tokens once, as a batch of its own, and copy their keys and values
        into the slots of every row the span covers (the same tokens at the same positions)."""
        width, wide = self.ids.shape[1], max(shared for shared, _ in self.spans)
        ids = torch.zeros((len(self.spans), wide), dtype=self.ids.dtype, device=self.ids.device)
        positions = torch.zeros_like(ids)
        valid = torch.zeros((len(self.spans), self.filled + wide), dtype=torch.bool, device=self.ids.device)
        valid[:, : self.filled] = True
        for j, (shared, rows) in enumerate(self.spans):
            begin = width - lengths[rows[0]]
            ids[j, wide - shared:] = self.ids[rows[0], begin:begin + shared]
            positions[j, wide - shared:] = self.positions[rows[0], begin:begin + shared]
            valid[j, self.filled + wide - shared:] = True
        openings = FusedBatch(self.net, self.prefix, ids, valid, positions, 0)
        openings.hidden()
        # one gather per layer: (span, its slot) -> (row, the same token's slot in that row)
        span, source_slot, row, slot = ([] for _ in range(4))
        for j, (shared, rows) in enumerate(self.spans):
            for member in rows:
                begin = self.filled + width - lengths[member]
                span += [j] * shared
                source_slot += range(self.filled + wide - shared, self.filled + wide)
                row += [member] * shared
                slot += range(begin, begin + shared)
        span, source_slot, row, slot = (torch.tensor(i, device=self.ids.device) for i in (span, source_slot, row, slot))
        for caches, sources in ((self.keys, openings.keys), (self.values, openings.values)):
            for cache, source in zip(caches, sources, strict=True):
                cache[row, :, slot] = source[span, :, source_slot]

    def feed(self, tokens: torch.Tensor) -> None:
        """The tokens just drawn (one per row) are the next input, one position on."""
        self.valid[:, self.filled] = True
        self.ids = tokens[:, None]
        self.positions = self.positions[:, -1:] + 1

    def keep(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` (old indices, in their new order) and drop the rest.

        Only rows that move are copied, into their new place in the same buffers: with ``Decoder``'s
        swap-removal, a step that ends k rows copies at most k rows of cache, not the whole batch.
        """
        moved = torch.nonzero(order != torch.arange(len(order), device=order.device)).flatten()
        sources = order[moved]
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                old[moved, :, : self.filled] = old[sources, :, : self.filled]
                cache[i] = old[: len(order)]
        self.valid, self.positions = self.valid[order], self.positions[order]
