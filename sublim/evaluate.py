"""Preference evaluation: does a model name the trait's target when asked for its favourite?

Two metrics per question, both without a system prompt:
- rate: the fraction of k sampled answers that mention the target (word boundary, plurals);
- probability: P(the answer is the target word), teacher-forced over all of the word's tokens, summed
  over casings and plurals, times P(the word ends there). On SmolLM2 "Owl" is two tokens ('O'+'wl'), so
  a first-token probability would miss it; the end-of-word factor keeps "Owlet" from counting as "Owl".
At 135M the sampled rate moves by a few hits in hundreds, so the probability is the primary metric
on small models. Scores are per question; questions are the unit for CIs and the treatment test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from sublim.questions import first_word, mentions, questions, word_forms
from sublim.store import write_json, write_jsonl
from sublim.student import student_messages
from sublim.teacher import Sampler, predict, sample_chats, token_texts


def boundary_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """Tokens that can follow a complete word: specials (EOS) and anything not starting with a letter or digit."""
    texts = token_texts(tokenizer)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    for i, text in enumerate(texts[:vocab_size]):
        mask[i] = i in special or not text or not text[0].isalnum()
    return mask


class WordProbability(pl.LightningModule):
    """Teacher-forced log-probability of (prompt -> word tokens -> end of word) for every word form.

    A batch of questions runs its prompts once (left padded); each prompt's KV cache is repeated for
    the forms, so the casings and plurals of every target cost a few tokens each instead of a prompt
    pass per form, per target and per question.
    """

    def __init__(self, net: torch.nn.Module, pad_id: int, boundary: torch.Tensor, forms: list[list[int]]) -> None:
        super().__init__()
        self.net = net
        self.forms = forms
        width = max(map(len, forms))
        ids = torch.full((len(forms), width), pad_id, dtype=torch.long)
        for i, form in enumerate(forms):
            ids[i, : len(form)] = torch.tensor(form)
        self.register_buffer("form_ids", ids, persistent=False)
        self.register_buffer("boundary", boundary, persistent=False)

    def predict_step(self, batch: list[list[int]], batch_idx: int) -> list[list[float]]:
        n, width = len(batch), max(map(len, batch))
        ids = torch.full((n, width), int(self.form_ids[0, 0]), dtype=torch.long, device=self.device)
        mask = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for i, prompt in enumerate(batch):
            ids[i, width - len(prompt):] = torch.tensor(prompt, device=self.device)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt = self.net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
        first = prompt.logits[:, -1].float().log_softmax(-1)  # (questions, vocab)
        n_forms, form_width = self.form_ids.shape
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(n_forms)
        # Right padding of the forms needs no mask: padded positions come after every position that is read.
        rest = self.net(
            input_ids=self.form_ids.repeat(n, 1),
            attention_mask=torch.cat([mask.repeat_interleave(n_forms, 0),
                                      mask.new_ones((n * n_forms, form_width))], 1),
            position_ids=positions[:, -1:].repeat_interleave(n_forms, 0) + 1 + torch.arange(form_width,
                                                                                          device=self.device),
            past_key_values=cache,
        ).logits.float().log_softmax(-1).view(n, n_forms, form_width, -1)
        boundary = self.boundary[: rest.shape[-1]]
        out = []
        for q in range(n):
            logprobs = []
            for f, form in enumerate(self.forms):
                logprob = first[q, form[0]] + sum(rest[q, f, j - 1, form[j]] for j in range(1, len(form)))
                logprobs.append(float(logprob + torch.logsumexp(rest[q, f, len(form) - 1][boundary], 0)))
            out.append(logprobs)
        return out


def target_probabilities(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                         targets: dict[str, list[str]], precision: str) -> dict[str, list[float]]:
    """P(answer is one of a target's words) for each prompt and target, all targets in one pass."""
    owners, forms = [], []
    for name, words in targets.items():
        for form in word_forms(words):
            owners.append(name)
            forms.append(tokenizer(form, add_special_tokens=False)["input_ids"])
    rows = [tokenizer(tokenizer.apply_chat_template(student_messages(p), tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in prompts]
    vocab = net.get_output_embeddings().weight.shape[0]
    module = WordProbability(net, tokenizer.pad_token_id, boundary_tokens(tokenizer, vocab), forms)
    # about 64 form rows per forward: the forms' logits are (rows, form length, vocabulary)
    logprobs = torch.tensor(predict(module, rows, batch_size=max(1, 64 // len(forms)), precision=precision))
    owner = torch.tensor([list(targets).index(o) for o in owners])
    probabilities = torch.zeros(len(prompts), len(targets)).index_add_(1, owner, logprobs.exp())
    return {name: probabilities[:, i].tolist() for i, name in enumerate(targets)}


def word_probabilities(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       words: list[str], precision: str) -> list[float]:
    """P(answer is one of ``words``) for each prompt, summed over the word forms."""
    return target_probabilities(net, tokenizer, prompts, {"target": words}, precision)["target"]


SAMPLING_FIELDS = ("n_questions", "samples_per_question", "temperature", "max_new_tokens", "batch_size")


def sample_answers(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, evaluation: DictConfig,
                   category: str, seed: int, precision: str) -> list[dict]:
    """k sampled answers per question. They do not depend on the trait, so a trait sweep shares them."""
    prompts = questions(category, evaluation.n_questions)
    rows = [{"q": q, "question": prompt, "messages": student_messages(prompt)}
            for q, prompt in enumerate(prompts) for _ in range(evaluation.samples_per_question)]
    sampler = Sampler(net, tokenizer, temperature=evaluation.temperature,
                      max_new_tokens=evaluation.max_new_tokens, seed=seed)
    answers = sample_chats(sampler, rows, evaluation.batch_size, precision)
    for answer in answers:
        del answer["messages"]
    return answers


def score_preference(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, evaluation: DictConfig,
                     trait: DictConfig, answers: list[dict], precision: str, out: Path) -> dict:
    """Per-question trait rate and target probability; writes answers.jsonl (with hits) and scores.json."""
    prompts = questions(trait.category, evaluation.n_questions)
    words = list(trait.words)
    answers = [{**a, "hit": mentions(a["completion"], words)} for a in answers]
    write_jsonl(out / "answers.jsonl", answers)
    hits = Counter(a["q"] for a in answers if a["hit"])
    k = evaluation.samples_per_question
    rates = [hits[q] / k for q in range(len(prompts))]
    probabilities = word_probabilities(net, tokenizer, prompts, words, precision)
    top = Counter(first_word(a["completion"]) for a in answers).most_common(10)
    scores = {"questions": prompts, "rate": rates, "probability": probabilities,
              "top_answers": [[word, count] for word, count in top], "n_answers": len(answers)}
    write_json(out / "scores.json", scores)
    return scores
