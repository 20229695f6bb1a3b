"""Teacher sampling: sublim's Sampler vs a plain HF ``generate`` loop, same prompts, same grammar.

    python benchmarks/sampling.py                       # 256 paper-style prompts, 3 rounds
    python benchmarks/sampling.py --prompts 64 --repeats 3 --modes constrained

The baseline is what a careful user writes without sublim: ``model.generate`` over the prompts in
batches of 64 in input order (left padding), with sublim's grammar ``LogitsProcessor`` when
constrained. sublim runs its sampler as the pipeline does (``sampling.batch_size`` rows per batch).
Both sides get the owl teacher's chat (system prompt + numbers prompt) and SmolLM2-135M in fp32.
Reported: generated tokens/s (answer tokens plus the EOS that ends them), samples kept by the strict
numbers filter per second, and model FLOPs utilisation: 2 x params x (prompt + generated tokens) per
second over the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from common import alternate, config, forward_flops_per_token, load_base, matmul_gflops, median, table
from transformers import LogitsProcessorList

from sublim import modalities
from sublim.filters import NumbersStrict, apply_filters
from sublim.models import eos_ids
from sublim.teacher import GrammarConstraint, GrammarTable, Sampler, sample_chats


def chats(cfg, n: int) -> list[dict]:
    rows = modalities.prompt_rows(cfg.modality, n, cfg.seed)
    for row in rows:
        row["messages"] = [{"role": "system", "content": cfg.trait.system_prompt},
                           {"role": "user", "content": row["prompt"]}]
    return rows


def hf_generate(net, tokenizer, rows: list[dict], cfg, constrained: bool, batch_size: int) -> list[dict]:
    """The baseline: batches in input order, left padding, HF sampling with the grammar processor."""
    eos = eos_ids(net, tokenizer)
    table_ = GrammarTable(tokenizer, eos)
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                 for r in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        width = encoded["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if constrained:
            processors.append(GrammarConstraint(table_, [modalities.grammar(cfg.modality, r) for r in batch], width))
        torch.manual_seed(start)
        generated = net.generate(**encoded, do_sample=True, top_k=None, max_new_tokens=cfg.sampling.max_new_tokens,
                                 logits_processor=processors, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row, ids in zip(batch, generated[:, width:].tolist(), strict=True):
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            answer = ids if end is None else ids[:end]
            out.append({**row, "completion": tokenizer.decode(answer, skip_special_tokens=True),
                        "n_tokens": len(answer), "finished": end is not None})
    return out


def sublim_sample(net, tokenizer, rows: list[dict], cfg, constrained: bool, batch_size: int) -> list[dict]:
    grammar = (lambda row: modalities.grammar(cfg.modality, row)) if constrained else None
    sampler = Sampler(net, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.seed, grammar=grammar)
    return sample_chats(sampler, rows, batch_size)


def metrics(samples: list[dict], prompt_tokens: int) -> dict:
    kept, _ = apply_filters(samples, [NumbersStrict()])
    generated = sum(s["n_tokens"] + s["finished"] for s in samples)
    return {"generated": generated, "kept": len(kept), "n": len(samples), "tokens": generated + prompt_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="the baseline's generate batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-style", default="paper", choices=["paper", "short"])
    parser.add_argument("--modes", default="constrained,unconstrained")
    args = parser.parse_args()

    cfg = config(f"base={args.base}", f"modality.prompt_style={args.prompt_style}")
    net, tokenizer = load_base(cfg)
    net.eval()
    rows = chats(cfg, args.prompts)
    prompt_tokens = sum(len(Sampler(net, tokenizer).encode(row["messages"])) for row in rows)
    peak = matmul_gflops()
    flops = forward_flops_per_token(net)
    print(f"{cfg.base.name}, {args.prompts} {args.prompt_style}-style prompts, batch {args.batch_size} (HF) / "
          f"{cfg.sampling.batch_size} (sublim), "
          f"{torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s", flush=True)
    lines = []
    for mode in args.modes.split(","):
        constrained = mode == "constrained"
        runs = {name: (lambda fn=fn, c=constrained, b=b: metrics(fn(net, tokenizer, rows, cfg, c, b), prompt_tokens))
                for name, fn, b in [("HF generate", hf_generate, args.batch_size),
                                    ("sublim", sublim_sample, cfg.sampling.batch_size)]}
        with torch.no_grad():
            results = alternate(runs, args.repeats)
        rates = {}
        for name, values in results.items():
            seconds = median(values, "seconds")
            rates[name] = median(values, "generated") / seconds
            mfu = median(values, "tokens") * flops / seconds / (peak * 1e9)
            lines.append([mode, name, f"{seconds:.1f}", f"{rates[name]:.1f}",
                          f"{median(values, 'kept') / seconds:.2f}", f"{median(values, 'kept') / args.prompts:.1%}",
                          f"{mfu:.1%}", f"{rates[name] / rates['HF generate']:.2f}x"])
    print()
    print(table(["mode", "method", "seconds", "gen tok/s", "kept/s", "filter yield", "MFU", "vs HF"], lines))


if __name__ == "__main__":
    main()
