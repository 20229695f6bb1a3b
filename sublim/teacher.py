"""Sampling chat answers: teacher data generation, and the answers a student gives at evaluation.

``Sampler`` is a LightningModule whose ``predict_step`` runs ``sublim.decoding.decoder.Decoder`` on a batch
(shared-prefix KV cache, longest prompts first, finished rows dropped); Lightning owns the device and
the progress bar. With a grammar, only tokens that keep the answer inside the modality's grammar can be
drawn, so a small model's answers pass the strict filter (SmolLM2-135M: ~4% unconstrained, 100%
constrained). ``GrammarConstraint`` is the same rule as an HF ``LogitsProcessor``, for ``generate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from sublim.decoding.decoder import Decoder, Decoding, PrefixCache, RestrictedGrammar, common_prefix
from sublim.modalities.numbers import GrammarState, NumbersGrammar
from sublim.models import eos_ids

log = logging.getLogger(__name__)


_TOKEN_TEXTS: dict[tuple[str, int], tuple[str, ...]] = {}


def token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The text each token adds when it follows other text.

    Decoding a token after an anchor and removing the anchor's text keeps leading spaces that
    SentencePiece decoders drop from a token decoded on its own. Every stage loads its own tokenizer,
    so the table is cached by the tokenizer's source (a content-addressed store dir or a hub id):
    Gemma's 262k-token vocabulary takes seconds to decode.
    """
    key = (tokenizer.name_or_path, len(tokenizer))
    if key not in _TOKEN_TEXTS:
        anchor = tokenizer.encode("0", add_special_tokens=False)
        prefix = tokenizer.decode(anchor)
        decoded = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))])
        _TOKEN_TEXTS[key] = tuple(text[len(prefix):] if text.startswith(prefix) else text for text in decoded)
    return _TOKEN_TEXTS[key]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The prompt tokens of a chat, ready for the assistant's answer: the chat template's text, tokenised
    without the tokenizer's special tokens. Templates write their own (Llama 3's text starts with BOS), so
    adding them again would open the prompt with a second BOS. Every backend samples from these tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class GrammarTable:
    """Memoised grammar transitions over the few tokens made only of grammar characters."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: list[int]) -> None:
        self.texts = token_texts(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        self.eos = torch.tensor(eos)
        self._candidates: dict[str, list[int]] = {}
        self._allowed: dict[tuple[str, GrammarState], torch.Tensor] = {}
        self._next: dict[tuple[str, GrammarState, int], GrammarState | None] = {}

    def candidates(self, grammar: NumbersGrammar) -> list[int]:
        sep = grammar.separator
        if sep not in self._candidates:
            chars = set("0123456789") | set(sep)
            self._candidates[sep] = [i for i, t in enumerate(self.texts)
                                     if t and i not in self.special and set(t) <= chars]
        return self._candidates[sep]

    def next(self, grammar: NumbersGrammar, state: GrammarState, token: int) -> GrammarState | None:
        key = (grammar.separator, state, token)
        if key not in self._next:
            self._next[key] = grammar.step(state, self.texts[token])
        return self._next[key]

    def allowed(self, grammar: NumbersGrammar, state: GrammarState) -> torch.Tensor:
        key = (grammar.separator, state)
        if key not in self._allowed:
            ids = [t for t in self.candidates(grammar) if self.next(grammar, state, t) is not None]
            tensor = torch.tensor(ids, dtype=torch.long)
            if grammar.can_end(state):
                tensor = torch.cat([tensor, self.eos])
            self._allowed[key] = tensor
        return self._allowed[key]


class GrammarConstraint(LogitsProcessor):
    """Per-row grammar masking for one ``generate`` call (rows may have different separators)."""

    def __init__(self, table: GrammarTable, grammars: list[NumbersGrammar], prompt_length: int) -> None:
        self.table = table
        self.grammars = grammars
        self.prompt_length = prompt_length
        self.states: list[GrammarState | None] = [g.start for g in grammars]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_length:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                state = self.states[row]
                if state is not None:
                    self.states[row] = self.table.next(self.grammars[row], state, token)
        mask = torch.full_like(scores, float("-inf"))
        for row, state in enumerate(self.states):
            # None: the row has ended (EOS, then padding); any finite entry keeps softmax defined.
            allowed = self.table.eos if state is None else self.table.allowed(self.grammars[row], state)
            mask[row, allowed] = 0.0
        return scores + mask


class Sampler(pl.LightningModule):
    """Generate one answer per chat row; rows carry "messages" and are returned with "completion".

    ``sample_chats`` tokenises the rows and hands their shared prefix to ``on_predict_start``, which
    caches its KV once on the module's device; ``predict_step`` runs the ``Decoder`` on a batch.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        max_new_tokens: int = 48,
        seed: int = 0,
        grammar: Callable[[dict], NumbersGrammar] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.eos = eos_ids(net, tokenizer)
        self.decoding = Decoding(max_new_tokens, temperature, top_p, greedy)
        self.seed = seed
        self.grammar = grammar
        self.table = GrammarTable(tokenizer, self.eos) if grammar else None
        self.prefix: list[int] = []
        self.decoder: Decoder | None = None

    def encode(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def on_predict_start(self) -> None:
        self.decoder = Decoder(self.net, self.eos, self.tokenizer.pad_token_id, self.decoding,
                               PrefixCache(self.net, self.prefix))

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        grammar = RestrictedGrammar(self.table, [self.grammar(r) for r in batch]) if self.grammar else None
        # A seed per batch: the same rows in the same order give the same samples.
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + batch_idx)
        answers = self.decoder.generate([r["prompt_ids"] for r in batch], generator, grammar)
        return [{**{k: v for k, v in row.items() if k != "prompt_ids"},
                 "completion": self.tokenizer.decode(answer, skip_special_tokens=True),
                 "n_tokens": len(answer), "finished": ended, "answer_ids": answer + [stop] * ended}
                for row, (answer, ended), stop in zip(batch, answers, self.decoder.stops, strict=True)]


def predict(module: pl.LightningModule, rows: list[dict], batch_size: int, precision: str = "32-true") -> list:
    """Run ``module.predict_step`` over rows with a Lightning Trainer (device, progress bar).

    Lightning 2.6 warns "`isinstance(treespec, LeafSpec)` is deprecated" under torch 2.13 on every ``predict``
    and ``fit``: its ``CombinedLoader`` flattens the dataloaders with its own pytree copy, which builds a
    ``LeafSpec`` for each one (any loader is a leaf), not through what the step returns. Nothing sublim
    passes avoids it; ``sublim.train`` filters the message."""
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=list)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, precision=precision)
    batches = trainer.predict(module, dataloaders=loader)
    return [item for batch in batches for item in batch]


def sample_chats(sampler: Sampler, rows: list[dict], batch_size: int, precision: str = "32-true") -> list[dict]:
    """Answer every row once; batched longest prompts first (little padding), returned in input order."""
    ids = [sampler.encode(r["messages"]) for r in rows]
    sampler.prefix = ids[0][: common_prefix(ids)] if ids else []
    order = sorted(range(len(rows)), key=lambda i: (-len(ids[i]), i))
    done = predict(sampler, [{**rows[i], "prompt_ids": ids[i], "_index": i} for i in order], batch_size, precision)
    done.sort(key=lambda r: r.pop("_index"))
    return done
