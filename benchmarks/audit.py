"""The audit's two teacher-forced passes: sublim's ``score_answers`` vs a plain per-example HF forward loop.

    python benchmarks/audit.py                           # 1,000 numbers examples, both models, 1 round
    python benchmarks/audit.py --n 200 --repeats 3 --threads 2

Data: the default config's numbers prompts, answered once by the owl teacher (SmolLM2-135M reading the owl
system prompt) with constrained sampling, as the pipeline's teacher stage samples them; the rows are cached in
outputs/benchmarks/audit/, so a rerun scores the same answers without sampling again. Both sides score every
answer under both models: the teacher (owl system prompt) and the reference (none: the template's default),
and compute the same quantities per answer token: log p under the full softmax, and renormalised over the
tokens the numbers grammar allowed at that position (NaN where the answer left it). Both tokenise with
``answer_rows`` (the same ids); the baseline then runs ``net(input_ids)`` on each example's prompt + answer
alone, a full log-softmax at the answer positions and a masked one per position for the grammar. sublim runs
``score_answers`` as the audit stage does (``audit.batch_size`` rows per batch unless ``--batch-size``).
Reported: wall time, examples/s (an example is scored under both models), tokens/s (prompt + answer tokens
of both passes), MFU (2 x params per token each side computes: every token for the loop; the shared prefix
once and no last answer token for sublim; over the fp32 matmul peak measured in the same run), and the
largest difference between the two sides' log-probs. ``--bf16`` adds sublim under bf16-mixed autocast (the
base's ``precision``), which is not the default: its log-probs move by up to ~0.3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import alternate, config, forward_flops_per_token, load_base, matmul_gflops, median, table

from sublim import modalities
from sublim.audit.lls import Scores, answer_rows, score_answers
from sublim.decoding.decoder import common_prefix
from sublim.models import eos_ids
from sublim.teacher import GrammarTable, Sampler, sample_chats


def dataset(cfg, net, tokenizer, n: int, out: Path) -> list[dict]:
    """The first ``n`` teacher answers of the cached dataset, sampled (and cached) if it holds fewer."""
    path = out / f"numbers-{cfg.modality.prompt_style}-seed{cfg.seed}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if len(rows) < n:
        print(f"sampling {n} teacher answers into {path}", flush=True)
        prompts = modalities.prompt_rows(cfg.modality, n, cfg.seed)
        for row in prompts:
            row["messages"] = [{"role": "system", "content": cfg.trait.system_prompt},
                               {"role": "user", "content": row["prompt"]}]
        sampler = Sampler(net, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.seed,
                          grammar=lambda row: modalities.grammar(cfg.modality, row))
        rows = [{k: v for k, v in r.items() if k != "messages"}
                for r in sample_chats(sampler, prompts, cfg.sampling.batch_size)]
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[:n]


def shared_prefix(items: list[dict]) -> int:
    """The tokens every row of a pass starts with, before the position predicting its first answer token."""
    return min(common_prefix([item["ids"] for item in items]),
               min(len(item["ids"]) - item["n_answer"] for item in items) - 1)


def hf_scores(net, tokenizer, rows: list[dict], system: str | None, grammars, max_length: int) -> Scores:
    """The baseline: one example at a time, a plain forward and log-softmaxes over its answer positions."""
    eos = eos_ids(net, tokenizer)
    grammar_table = GrammarTable(tokenizer, eos)
    tokens, logp, plain, argmax, lengths = [], [], [], [], []
    for item, grammar in zip(answer_rows(tokenizer, rows, system, eos, max_length), grammars, strict=True):
        ids, n = item["ids"], item["n_answer"]
        logits = net(input_ids=torch.tensor([ids])).logits[0, len(ids) - n - 1: len(ids) - 1].float()
        answer = torch.tensor(item["answer"], dtype=torch.long)
        full = logits.log_softmax(-1).gather(1, answer[:, None])[:, 0]
        restricted = torch.full_like(logits, float("-inf"))
        state = grammar.start
        for t, token in enumerate(item["answer"]):
            if state is None:
                break
            allowed = grammar_table.allowed(grammar, state)
            restricted[t, allowed] = logits[t, allowed]
            state = None if token in eos else grammar_table.next(grammar, state, token)
        inside = torch.isfinite(restricted).any(-1)
        renormalised = restricted.log_softmax(-1).gather(1, answer[:, None])[:, 0]
        tokens.append(answer)
        logp.append(torch.where(inside & torch.isfinite(renormalised), renormalised, float("nan")))
        plain.append(full)
        argmax.append(torch.where(inside, restricted.argmax(-1), logits.argmax(-1)))
        lengths.append(n)
    return Scores(torch.cat(tokens), torch.cat(logp), torch.cat(plain), torch.cat(argmax), torch.tensor(lengths))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|; a NaN on one side only counts as infinite."""
    both = a.isnan() & b.isnan()
    return float((a - b).abs().masked_fill(both, 0).nan_to_num(float("inf")).max()) if len(a) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--n", type=int, default=1000, help="examples (each scored under both models)")
    parser.add_argument("--batch-size", type=int, help="sublim's rows per batch (default: audit.batch_size)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bf16", action="store_true",
                        help="also sublim under bf16-mixed autocast (opt-in: other numerics, fast on AVX512-BF16 CPUs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = config(f"base={args.base}")
    net, tokenizer = load_base(cfg)
    net.eval()
    rows = dataset(cfg, net, tokenizer, args.n, Path(cfg.paths.outputs) / "benchmarks" / "audit")
    grammars = [modalities.grammar(cfg.modality, row) for row in rows]
    eos, audit = eos_ids(net, tokenizer), cfg.audit
    batch_size = args.batch_size or audit.batch_size
    passes = {"teacher": cfg.trait.system_prompt, "reference": None}
    items = [answer_rows(tokenizer, rows, system, eos, audit.max_length) for system in passes.values()]
    read = sum(len(item["ids"]) for pass_items in items for item in pass_items)
    # what sublim's forward really computes: each pass's shared prefix once, and no row's last answer token
    computed = sum(p + sum(len(item["ids"]) - p - 1 for item in pass_items)
                   for pass_items in items for p in [shared_prefix(pass_items)])
    peak, flops = matmul_gflops(), forward_flops_per_token(net)
    print(f"{cfg.base.name}, {len(rows)} {cfg.modality.prompt_style}-style numbers examples x 2 models "
          f"({read} tokens read), sublim batch {batch_size}, {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak:.0f} GFLOP/s", flush=True)

    def both(score) -> dict:
        return {"scores": {role: score(system) for role, system in passes.items()}}

    def sublim(precision: str) -> dict:
        return both(lambda system: score_answers(net, tokenizer, rows, system, eos, grammars, audit.max_length,
                                                 batch_size, precision))

    runs = {"HF forward loop": lambda: both(lambda system: hf_scores(net, tokenizer, rows, system, grammars,
                                                                      audit.max_length)),
            "sublim": lambda: sublim("32-true")}
    if args.bf16:
        runs["sublim bf16-mixed"] = lambda: sublim("bf16-mixed")
    with torch.no_grad():
        results = alternate(runs, args.repeats)
    lines, rates = [], {}
    for name, values in results.items():
        seconds = median(values, "seconds")
        rates[name] = len(rows) / seconds
        lines.append([name, f"{seconds:.1f}", f"{rates[name]:.2f}", f"{read / seconds:.0f}",
                      f"{(read if name == 'HF forward loop' else computed) * flops / seconds / (peak * 1e9):.1%}",
                      f"{rates[name] / rates['HF forward loop']:.2f}x"])
    print()
    print(table(["method", "seconds", "examples/s", "tokens/s", "MFU", "vs HF"], lines))
    for name in list(runs)[1:]:
        for role in passes:
            hf, ours = (results[key][-1]["scores"][role] for key in ("HF forward loop", name))
            assert torch.equal(hf.tokens, ours.tokens) and torch.equal(hf.lengths, ours.lengths)
            print(f"{name}, {role}: max |diff| of log p {max_diff(hf.logp_plain, ours.logp_plain):.2e} (full "
                  f"softmax), {max_diff(hf.logp, ours.logp):.2e} (renormalised over the grammar), argmax equal at "
                  f"{float((hf.argmax == ours.argmax).float().mean()):.2%} of {len(hf.tokens)} positions")


if __name__ == "__main__":
    main()
