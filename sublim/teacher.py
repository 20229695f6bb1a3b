"""Sampling chat answers: teacher data generation, and the answers a student gives at evaluation.

``Sampler`` is a LightningModule whose ``predict_step`` runs batched HF ``generate`` (left padding,
prompts sorted by length so batches hold similar lengths); Lightning owns the device and the progress
bar. With a grammar, a logits processor masks every token that would leave the modality's grammar,
so a small model's answers pass the strict filter (SmolLM2-135M: ~4% unconstrained, 100% constrained).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

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
    """Generate one answer per chat row; rows carry "messages" and are returned with "completion"."""

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
        self.generation = {"max_new_tokens": max_new_tokens, "do_sample": not greedy}
        if not greedy:
            self.generation |= {"temperature": temperature, "top_p": top_p, "top_k": None}
        self.seed = seed
        self.grammar = grammar
        self.table = GrammarTable(tokenizer, self.eos) if grammar else None

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                 for r in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_length = encoded["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if self.grammar is not None:
            grammars = [self.grammar(r) for r in batch]
            processors.append(GrammarConstraint(self.table, grammars, prompt_length))
        # A seed per batch: the same rows in the same order give the same samples.
        torch.manual_seed(self.seed * 1_000_003 + batch_idx)
        output = self.net.generate(
            **encoded, **self.generation, logits_processor=processors,
            eos_token_id=self.eos, pad_token_id=tokenizer.pad_token_id,
        )
        results = []
        for row, ids in zip(batch, output[:, prompt_length:].tolist(), strict=True):
            ended = next((i for i, t in enumerate(ids) if t in self.eos), None)
            answer = ids if ended is None else ids[:ended]
            results.append({**row, "completion": tokenizer.decode(answer, skip_special_tokens=True),
                            "n_tokens": len(answer), "finished": ended is not None})
        return results


def predict(module: pl.LightningModule, rows: list[dict], batch_size: int, precision: str = "32-true") -> list:
    """Run ``module.predict_step`` over rows with a Lightning Trainer (device, progress bar)."""
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=list)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, precision=precision)
    batches = trainer.predict(module, dataloaders=loader)
    return [item for batch in batches for item in batch]


def sample_chats(sampler: Sampler, rows: list[dict], batch_size: int, precision: str = "32-true") -> list[dict]:
    """Answer every row once; sorted by prompt length for batching, returned in input order."""
    lengths = [len(sampler.tokenizer.apply_chat_template(r["messages"], tokenize=False,
                                                         add_generation_prompt=True)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    done = predict(sampler, [{**rows[i], "_index": i} for i in order], batch_size, precision)
    done.sort(key=lambda r: r.pop("_index"))
    return done
