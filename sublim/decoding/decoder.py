"""Batched sampling for CPU-sized models: what HF ``generate`` spends its time on, done once.

Every teacher prompt of a dataset starts with the same tokens (chat template, system prompt), so their
KV cache is computed once and copied into each batch; only the per-prompt suffix is prefilled. A
grammar-constrained decoder may only emit a dozen tokens, so the output head is restricted to them: the
softmax over those rows equals the masked full-vocabulary softmax, at a 1/4000th of the head's cost.
Finished rows leave the batch at once (the last rows move into their places). Positions are explicit,
so the gap between the shared prefix and a shorter suffix is masked padding that the model never sees.
Llama-family models (SmolLM2, Llama, Qwen2) run ``sublim.decoding.fused``: a preallocated cache, fused attention
on the key/value heads, in-place updates, template openings shared by several prompts prefilled once,
the rest prefilled in chunks of similar length, and on a CPU each forward's rows split between the cores;
every other model runs its own forward with a ``DynamicCache`` (the ``cache`` argument and output field,
transformers 5.24's names for what was ``past_key_values``).

The distribution of a sample is that of HF ``generate`` with the same processors (same logits, same
temperature and top-p); the random stream differs, so the same seed gives other (equally distributed)
samples than ``generate``. The same prompts and seed give the same samples (rows are drawn in an order
fixed by the prompts). Greedy decoding gives the same tokens (tests/test_decoding.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from sublim.decoding.fused import FusedBatch, supported, unwrap
from sublim.modalities.numbers import GrammarState, NumbersGrammar


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each prompt at least one token of its own."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(map(len, prompts)) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def shared_spans(suffixes: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Groups of rows whose suffixes open with the same tokens, as (how many tokens, rows).

    Prompts written from templates share each template's opening after the common prefix; prefilling an
    opening once for its group skips those tokens for the other rows. Over the trie of suffixes, a group
    either shares its common opening or splits at the next token into subgroups with longer ones,
    whichever skips more tokens. Every row keeps at least one token of its own.
    """
    def best(rows: list[int], depth: int) -> tuple[int, list[tuple[int, list[int]]]]:
        if len(rows) < 2:
            return 0, []
        limit = min(len(suffixes[r]) for r in rows) - 1
        first, shared = suffixes[rows[0]], min(depth, limit)
        while shared < limit and all(suffixes[r][shared] == first[shared] for r in rows):
            shared += 1
        whole = ((len(rows) - 1) * shared, [(shared, rows)] if shared else [])
        if shared == limit:
            return whole
        branches: dict[int, list[int]] = {}
        for r in rows:
            branches.setdefault(suffixes[r][shared], []).append(r)
        split = [best(branch, shared + 1) for branch in branches.values()]
        parts = (sum(saved for saved, _ in split), [group for _, groups in split for group in groups])
        return max(whole, parts, key=lambda option: option[0])

    return best(list(range(len(suffixes))), 0)[1]


def swap_removal(finished: list[bool]) -> list[int]:
    """The rows to keep, in their new order: each finished row among the first survivors' places takes a
    surviving row from the end, so dropping k rows moves at most k rows."""
    order = list(range(len(finished) - sum(finished)))
    tail = (i for i in range(len(order), len(finished)) if not finished[i])
    return [next(tail) if finished[i] else i for i in order]


class PrefixCache:
    """The KV cache of a shared prompt prefix, computed once and copied into every batch."""

    def __init__(self, net: torch.nn.Module, prefix: Sequence[int]) -> None:
        self.length = len(prefix)
        self.cache: DynamicCache | None = None
        if prefix:
            device = next(net.parameters()).device
            with torch.no_grad():
                ids = torch.tensor([list(prefix)], device=device)
                self.cache = net(input_ids=ids, use_cache=True, logits_to_keep=1).cache

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefix keys and values, [1, kv heads, prefix, head dim]."""
        return [] if self.cache is None else [(layer.keys, layer.values) for layer in self.cache.layers]

    def batch(self, rows: int) -> DynamicCache | None:
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


class RestrictedGrammar:
    """Per-row grammar states over the restricted vocabulary the output head computes.

    ``ids`` holds every token any row's grammar can emit (digits, the prompts' separators, EOS);
    ``masks`` gives, per active row, which of them its state allows.
    """

    def __init__(self, table, grammars: list[NumbersGrammar]) -> None:
        self.table = table
        self.grammars = grammars
        allowed = set(table.eos.tolist())
        for grammar in {g.separator: g for g in grammars}.values():
            allowed.update(table.candidates(grammar))
        self.ids = torch.tensor(sorted(allowed), dtype=torch.long)
        self._position = {int(t): i for i, t in enumerate(self.ids)}
        self._masks: dict[tuple[str, GrammarState], torch.Tensor] = {}
        self.states: list[GrammarState | None] = [g.start for g in grammars]

    def _mask(self, grammar: NumbersGrammar, state: GrammarState | None) -> torch.Tensor:
        if state is None:
            return torch.isin(self.ids, self.table.eos)
        key = (grammar.separator, state)
        if key not in self._masks:
            mask = torch.zeros(len(self.ids), dtype=torch.bool)
            mask[[self._position[int(t)] for t in self.table.allowed(grammar, state)]] = True
            self._masks[key] = mask
        return self._masks[key]

    def masks(self, rows: list[int]) -> torch.Tensor:
        return torch.stack([self._mask(self.grammars[r], self.states[r]) for r in rows])

    def advance(self, rows: list[int], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            state = self.states[row]
            if state is not None:
                self.states[row] = self.table.next(self.grammars[row], state, token)


@dataclass
class Decoding:
    """How tokens are drawn: HF ``generate``'s temperature, top-p and greedy semantics."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_p < 1.0:
            # the smallest set of tokens whose probability reaches top_p (HF's TopPLogitsWarper)
            ordered, order = logits.sort(-1)
            tail = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[:, -1] = False
            logits = logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class HFBatch:
    """One batch being decoded through the model's own forward and a ``DynamicCache`` (any architecture)."""

    def __init__(self, net: torch.nn.Module, prefix: PrefixCache, ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.net = net
        self.cache = prefix.batch(len(ids)) or DynamicCache()
        self.ids, self.mask, self.positions = ids, mask, positions

    def inputs(self) -> dict:
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.positions,
                "cache": self.cache, "use_cache": True}

    def hidden(self) -> torch.Tensor:
        """Feed the pending tokens; the last position's final hidden state per row."""
        # the transformer body under the LM head, under a PEFT wrapper if any (its adapters apply)
        return unwrap(self.net).base_model(**self.inputs()).last_hidden_state[:, -1]

    def logits(self) -> torch.Tensor:
        """Feed the pending tokens; the model's own next-token logits (any head, scaling or soft-cap)."""
        return self.net(**self.inputs(), logits_to_keep=1).logits[:, -1]

    def feed(self, tokens: torch.Tensor) -> None:
        self.ids = tokens[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], 1)
        self.positions = self.positions[:, -1:] + 1

    def keep(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` (old indices, in their new order) and drop the rest."""
        self.cache.batch_select_indices(order)
        self.mask, self.positions = self.mask[order], self.positions[order]


class Decoder:
    """Sample answers for a batch of tokenised prompts that start with a shared, cached prefix.

    Llama-family models run ``sublim.decoding.fused`` (preallocated cache, in-place updates); others, and
    ``fused=False``, the model's own forward.
    """

    def __init__(self, net: torch.nn.Module, eos: list[int], pad_id: int, decoding: Decoding,
                 prefix: PrefixCache, fused: bool = True) -> None:
        self.net = net
        self.eos = set(eos)
        self.pad_id = pad_id
        self.decoding = decoding
        self.prefix = prefix
        self.fused = fused and supported(net)
        self.head = net.get_output_embeddings()
        self.softcap = getattr(net.config, "final_logit_softcapping", None)
        self.stops: list[int | None] = []  # of the last generate call

    def prefill_order(self, prompts: list[list[int]]) -> list[int]:
        """Prompts by how many tokens are left to prefill after the prefix and shared openings, most first:
        consecutive rows then make chunks with little padding."""
        suffixes = [prompt[self.prefix.length:] for prompt in prompts]
        left = [len(suffix) for suffix in suffixes]
        for shared, rows in shared_spans(suffixes) if self.fused else ():
            for row in rows:
                left[row] -= shared
        return sorted(range(len(prompts)), key=lambda i: -left[i])

    def start(self, prompts: list[list[int]]) -> FusedBatch | HFBatch:
        """Left-pad the suffixes after the shared prefix; explicit positions keep the padding invisible."""
        device = self.head.weight.device
        p = self.prefix.length
        suffixes = [prompt[p:] for prompt in prompts]
        width = max(map(len, suffixes))
        n = len(prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, p + width), dtype=torch.long)
        mask[:, :p] = 1
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix)
            mask[i, p + width - len(suffix):] = 1
            positions[i, width - len(suffix):] = torch.arange(p, p + len(suffix))
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        if self.fused:
            return FusedBatch(self.net, self.prefix.layers(), ids, mask.bool(), positions,
                              self.decoding.max_new_tokens, shared_spans(suffixes))
        return HFBatch(self.net, self.prefix, ids, mask, positions)

    def logits(self, batch: FusedBatch | HFBatch, vocab: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits of every row, over ``vocab`` only when given (the restricted head)."""
        if vocab is None and isinstance(batch, HFBatch):
            return batch.logits().float()
        hidden = batch.hidden()
        weight, bias = self.head.weight, self.head.bias
        if vocab is not None:
            weight, bias = weight[vocab], None if bias is None else bias[vocab]
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], generator: torch.Generator,
                 grammar: RestrictedGrammar | None = None) -> list[tuple[list[int], bool]]:
        """(answer tokens without EOS, whether EOS ended it) per prompt, in input order; ``self.stops`` keeps which
        EOS token ended each answer (None: cut by max_new_tokens), so the tokens a model emitted can be scored."""
        device = self.head.weight.device
        active = self.prefill_order(prompts)  # batch row -> prompt index
        batch = self.start([prompts[i] for i in active])
        vocab = None if grammar is None else grammar.ids.to(device)
        n = len(prompts)
        answers: list[list[int]] = [[] for _ in range(n)]
        ended = [False] * n
        self.stops = [None] * n
        done: set[int] = set()
        for step in range(self.decoding.max_new_tokens):
            logits = self.logits(batch, vocab)
            if grammar is not None:
                logits = logits.masked_fill(~grammar.masks(active).to(device), float("-inf"))
            chosen = self.decoding.choose(logits, generator)
            tokens = (chosen if vocab is None else vocab[chosen]).tolist()
            for row, token in zip(active, tokens, strict=True):
                if row in done:
                    continue
                if token in self.eos:
                    ended[row], self.stops[row] = True, token
                    done.add(row)
                else:
                    answers[row].append(token)
            if grammar is not None:
                grammar.advance(active, tokens)
            if len(done) == n or step + 1 == self.decoding.max_new_tokens:
                break
            order = swap_removal([row in done for row in active])
            if len(order) < len(active):
                batch.keep(torch.tensor(order, device=device))
                active = [active[i] for i in order]
                tokens = [tokens[i] for i in order]
            batch.feed(torch.tensor(tokens, device=device))
        return list(zip(answers, ended, strict=True))
