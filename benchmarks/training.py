"""Student LoRA training: sublim's Lightning student vs TRL's ``SFTTrainer``, same data and LoRA.

    python benchmarks/training.py                        # 64 examples, 1 epoch, batch 8, 3 rounds
    python benchmarks/training.py --examples 128 --epochs 2

Both sides train SmolLM2-135M (fp32) with the student config's LoRA (r, alpha, target modules), AdamW
at the same learning rate and batch size, on the same (numbers prompt -> number list) chats, with the
loss on the completion only (TRL: prompt-completion data, ``completion_only_loss``). The completions
are drawn from a seeded RNG in the teacher's format, so no sampling is needed first; training speed
depends on lengths, not on which numbers. Trained tokens/s counts every non-padding token of every
step (prompt and answer), the same count on both sides; the model is loaded before the clock starts.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import alternate, config, forward_flops_per_token, load_base, matmul_gflops, median, table

from sublim import modalities
from sublim.student import student_messages, tokenize_example, train_lora


def examples(cfg, n: int) -> list[dict]:
    rng = random.Random(cfg.seed)
    rows = []
    for row in modalities.prompt_rows(cfg.modality, n, cfg.seed):
        numbers = [str(rng.randint(0, 999)) for _ in range(rng.randint(5, cfg.modality.answer_count))]
        rows.append({"prompt": row["prompt"], "completion": row["separator"].join(numbers)})
    return rows


def trained_tokens(tokenizer, rows: list[dict], cfg, epochs: int) -> int:
    return epochs * sum(len(tokenize_example(tokenizer, r["prompt"], r["completion"], cfg.student.max_length)
                            ["input_ids"]) for r in rows)


def run_sublim(cfg, rows: list[dict], epochs: int) -> dict:
    net, tokenizer = load_base(cfg)
    student = cfg.student.copy()
    student.epochs = epochs
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train_lora(net, tokenizer, rows, student, cfg.seed, Path(out))
        seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "tokens": trained_tokens(tokenizer, rows, cfg, epochs)}


def run_trl(cfg, rows: list[dict], epochs: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    net, tokenizer = load_base(cfg)
    s = cfg.student
    data = Dataset.from_list([{"prompt": student_messages(r["prompt"]),
                               "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=s.batch_size,
            learning_rate=s.lr, warmup_steps=s.warmup_steps, lr_scheduler_type="linear", weight_decay=s.weight_decay,
            max_length=s.max_length, completion_only_loss=True, packing=False, bf16=False, fp16=False,
            use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=cfg.seed, disable_tqdm=True,
        )
        lora = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=net, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "tokens": trained_tokens(tokenizer, rows, cfg, epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = config(f"base={args.base}")
    rows = examples(cfg, args.examples)
    peak = matmul_gflops()
    net, _ = load_base(cfg)
    flops = 3 * forward_flops_per_token(net)  # forward + backward, the usual 6N per token
    print(f"{cfg.base.name}, {args.examples} examples x {args.epochs} epoch(s), batch {cfg.student.batch_size}, "
          f"LoRA r={cfg.student.r}, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s", flush=True)
    results = alternate({"TRL SFTTrainer": lambda: run_trl(cfg, rows, args.epochs),
                         "sublim": lambda: run_sublim(cfg, rows, args.epochs)}, args.repeats)
    lines, rates = [], {}
    for name, values in results.items():
        seconds = median(values, "train_seconds")
        rates[name] = median(values, "tokens") / seconds
        lines.append([name, f"{seconds:.1f}", f"{rates[name]:.1f}", f"{rates[name] * flops / (peak * 1e9):.1%}",
                      f"{rates[name] / rates['TRL SFTTrainer']:.2f}x"])
    print()
    print(table(["method", "seconds", "trained tok/s", "MFU (6N)", "vs TRL"], lines))


if __name__ == "__main__":
    main()
