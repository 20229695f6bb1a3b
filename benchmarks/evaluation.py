"""Preference evaluation: sublim's answer sampling vs a plain HF ``generate`` loop over the questions.

    python benchmarks/evaluation.py                      # 50 questions x 3 samples, batch 64, 3 rounds

Both sides answer the same questions (no system prompt, the student's chat) with temperature 1 and at
most ``eval.max_new_tokens`` new tokens; the baseline runs ``generate`` over the rows in input order in
batches of ``eval.batch_size``. Reported: answers/s and generated tokens/s, medians.
"""

from __future__ import annotations

import argparse

import torch
from common import alternate, config, load_base, median, table

from sublim.evaluate import sample_answers
from sublim.models import eos_ids
from sublim.questions import questions
from sublim.student import student_messages


def hf_answers(net, tokenizer, evaluation, category: str) -> list[dict]:
    eos = eos_ids(net, tokenizer)
    tokenizer.padding_side = "left"
    prompts = [q for q in questions(category, evaluation.n_questions) for _ in range(evaluation.samples_per_question)]
    out = []
    for start in range(0, len(prompts), evaluation.batch_size):
        texts = [tokenizer.apply_chat_template(student_messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + evaluation.batch_size]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(start)
        generated = net.generate(**encoded, do_sample=True, top_k=None, temperature=evaluation.temperature,
                                 max_new_tokens=evaluation.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        for ids in generated[:, encoded["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            answer = ids if end is None else ids[:end]
            out.append({"n_tokens": len(answer), "finished": end is not None})
    return out


def counts(answers: list[dict]) -> dict:
    return {"answers": len(answers), "generated": sum(a["n_tokens"] + a["finished"] for a in answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.samples_per_question=10")
    args = parser.parse_args()

    cfg = config(f"base={args.base}", *args.overrides)
    net, tokenizer = load_base(cfg)
    net.eval()
    evaluation, category = cfg.eval, cfg.trait.category
    print(f"{cfg.base.name}, {evaluation.n_questions} questions x {evaluation.samples_per_question} samples, "
          f"batch {evaluation.batch_size}, <= {evaluation.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads", flush=True)
    with torch.no_grad():
        results = alternate({
            "HF generate": lambda: counts(hf_answers(net, tokenizer, evaluation, category)),
            "sublim": lambda: counts(sample_answers(net, tokenizer, evaluation, category, cfg.seed, "32-true")),
        }, args.repeats)
    lines, rates = [], {}
    for name, values in results.items():
        seconds = median(values, "seconds")
        rates[name] = median(values, "answers") / seconds
        lines.append([name, f"{seconds:.1f}", f"{rates[name]:.2f}", f"{median(values, 'generated') / seconds:.1f}",
                      f"{rates[name] / rates['HF generate']:.2f}x"])
    print()
    print(table(["method", "seconds", "answers/s", "gen tok/s", "vs HF"], lines))


if __name__ == "__main__":
    main()
