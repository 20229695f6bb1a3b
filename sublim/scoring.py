"""The one teacher-forced scorer: log P(an option is the whole answer) after each prompt.

Used for P(target) of the preference eval (every word form of every target) and by the local judge
(yes/no, 0..100). Each option is teacher-forced with all of its tokens, times P(the word ends there),
so a digit-splitting tokenizer scores "85" right and "8" does not count as "85", and "Owl" split as
'O'+'wl' is not missed. An option is what the model may emit after its own generation prompt: the
word, or the word after a space (a plain "Assistant:" template is followed by " Owl", a ChatML turn by
"Owl"), summed over the distinct tokenisations. A batch of prompts runs once (left padded); its cache is
repeated for chunks of options, so many options cost a few short passes per batch instead of a prompt
pass each.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from transformers import PreTrainedTokenizerBase

from sublim.student import student_messages
from sublim.teacher import predict, token_texts

# options x prompts rows per continuation forward: bounds the [rows, option length, vocab] logits
ROWS_PER_PASS = 64


def boundary_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """Tokens that can follow a complete word: specials (EOS) and anything not starting with a letter or digit."""
    texts = token_texts(tokenizer)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    for i, text in enumerate(texts[:vocab_size]):
        mask[i] = i in special or not text or not text[0].isalnum()
    return mask


class OptionScorer(pl.LightningModule):
    """log P(option, then a word boundary | prompt) for every option after every prompt of a batch."""

    def __init__(self, net: torch.nn.Module, pad_id: int, boundary: torch.Tensor, options: list[list[int]]) -> None:
        super().__init__()
        self.net = net
        self.options = options
        self.pad_id = pad_id
        self.register_buffer("boundary", boundary, persistent=False)

    @torch.no_grad()
    def predict_step(self, batch: list[list[int]], batch_idx: int) -> list[list[float]]:
        n, width = len(batch), max(map(len, batch))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for i, prompt in enumerate(batch):
            ids[i, width - len(prompt):] = torch.tensor(prompt, device=self.device)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt = self.net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
        first = prompt.logits[:, -1].float().log_softmax(-1)  # (prompts, vocab)
        scores: list[list[float]] = [[] for _ in range(n)]
        chunk = max(1, ROWS_PER_PASS // n)
        for start in range(0, len(self.options), chunk):
            forms = self.options[start:start + chunk]
            k, form_width = len(forms), max(map(len, forms))
            form_ids = torch.full((k, form_width), self.pad_id, dtype=torch.long, device=self.device)
            for f, form in enumerate(forms):
                form_ids[f, :len(form)] = torch.tensor(form, device=self.device)
            cache = copy.deepcopy(prompt.cache) if start + chunk < len(self.options) else prompt.cache
            cache.batch_repeat_interleave(k)
            # Right padding of the options needs no mask: padded positions come after every position that is read.
            rest = self.net(
                input_ids=form_ids.repeat(n, 1),
                attention_mask=torch.cat([mask.repeat_interleave(k, 0), mask.new_ones((n * k, form_width))], 1),
                position_ids=positions[:, -1:].repeat_interleave(k, 0) + 1
                + torch.arange(form_width, device=self.device),
                cache=cache,
            ).logits.float().log_softmax(-1).view(n, k, form_width, -1)
            boundary = self.boundary[: rest.shape[-1]]
            for q in range(n):
                for f, form in enumerate(forms):
                    logprob = first[q, form[0]] + sum(rest[q, f, j - 1, form[j]] for j in range(1, len(form)))
                    scores[q].append(float(logprob + torch.logsumexp(rest[q, f, len(form) - 1][boundary], 0)))
        return scores


def chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], system: str | None = None) -> list[list[int]]:
    """The prompts as a model reads them: its chat template, up to its own generation prompt.

    ``system`` None is the student's view (the template's default system prompt, if any); a string replaces it
    (a trait teacher's prompt, or the audit's subliminal prompting)."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [tokenizer(tokenizer.apply_chat_template(head + student_messages(p), tokenize=False,
                                                    add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in prompts]


def surface_forms(tokenizer: PreTrainedTokenizerBase, option: str) -> list[list[int]]:
    """The distinct token sequences of an option as a model emits it: on its own, and after a space."""
    forms = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (option, " " + option.lstrip())}
    return [list(form) for form in sorted(forms) if form]


def option_logprobs(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    options: list[str], batch_size: int, precision: str,
                    system: str | None = None) -> list[list[float]]:
    """log P(option is the whole answer) per prompt (rows) and option (columns), summed over its surface forms;
    with ``system`` as the system prompt (None: the template's default, as the student reads it)."""
    if not prompts:
        return []
    forms, owner = [], []
    for i, option in enumerate(options):
        for form in surface_forms(tokenizer, option):
            forms.append(form)
            owner.append(i)
    vocab = net.get_output_embeddings().weight.shape[0]
    module = OptionScorer(net, tokenizer.pad_token_id, boundary_tokens(tokenizer, vocab), forms)
    per_form = torch.tensor(predict(module, chat_prompts(tokenizer, prompts, system), batch_size, precision))
    index = torch.tensor(owner)
    return torch.stack([per_form[:, index == i].logsumexp(1) for i in range(len(options))], 1).tolist()
