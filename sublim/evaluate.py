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

    The prompt runs once per question; its KV cache is repeated for the forms, so six casings and
    plurals cost a few extra tokens each instead of six prompt passes.
    """

    def __init__(self, net: torch.nn.Module, pad_id: int, boundary: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.pad_id = pad_id
        self.register_buffer("boundary", boundary, persistent=False)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[list[float]]:
        return [self._question(row["prompt_ids"], row["word_ids"]) for row in batch]

    def _question(self, prompt_ids: list[int], forms: list[list[int]]) -> list[float]:
        prompt = self.net(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True, logits_to_keep=1)
        first = prompt.logits[0, -1].float().log_softmax(-1)
        width = max(map(len, forms))
        ids = torch.full((len(forms), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, form in enumerate(forms):
            ids[i, : len(form)] = torch.tensor(form, device=self.device)
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(len(forms))
        # Right padding needs no mask: padded positions come after every position that is read.
        mask = torch.ones((len(forms), len(prompt_ids) + width), dtype=torch.long, device=self.device)
        rest = self.net(input_ids=ids, past_key_values=cache, attention_mask=mask).logits.float().log_softmax(-1)
        boundary = self.boundary[: rest.shape[-1]]
        out = []
        for i, form in enumerate(forms):
            logprob = first[form[0]] + sum(rest[i, j - 1, form[j]] for j in range(1, len(form)))
            out.append(float(logprob + torch.logsumexp(rest[i, len(form) - 1][boundary], 0)))
        return out


def word_probabilities(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       words: list[str], precision: str) -> list[float]:
    """P(answer is one of ``words``) for each prompt, summed over the word forms."""
    forms = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in word_forms(words)]
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(student_messages(prompt), tokenize=False, add_generation_prompt=True)
        rows.append({"prompt_ids": tokenizer(text, add_special_tokens=False)["input_ids"], "word_ids": forms})
    vocab = net.get_output_embeddings().weight.shape[0]
    module = WordProbability(net, tokenizer.pad_token_id, boundary_tokens(tokenizer, vocab))
    logprobs = predict(module, rows, batch_size=1, precision=precision)
    return [float(torch.tensor(values).exp().sum()) for values in logprobs]


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
