"""The GPU path on tiny bases: a whole bf16-mixed job, greedy decoding vs HF generate, teacher logits vs the CPU's.

Marked ``gpu`` and skipped without a CUDA device ("no CUDA device"); ``bash benchmarks/gpu_check.sh`` runs them
with a short benchmark on any CUDA machine (docs/gpu.md). Only the tiny bases built from a config are used (no
download, no embedded wheel). ``SUBLIM_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU, to check the tests
themselves on a machine without a GPU: it proves nothing about CUDA.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import pytorch_lightning as pl
import torch

import sublim.decoding.decoder
import sublim.distill
import sublim.student
import sublim.training
from sublim import modalities
from sublim.decoding.decoder import Decoder, Decoding, PrefixCache, RestrictedGrammar, common_prefix
from sublim.distill import allowed_tokens, teacher_logits
from sublim.models import eos_ids
from sublim.teacher import GrammarTable, Sampler, sample_chats
from sublim.train import run_job
from tests.conftest import TINY
from tests.test_decoding import hf_greedy_ends

DEVICE = os.environ.get("SUBLIM_GPU_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]

# Greedy choices whose logits differ by less than this are ties: CUDA kernels sum in another order than
# HF's forward, so either token is a correct greedy choice (see _tie).
TIE = 1e-4


def _chat_rows(cfg, n: int, seed: int = 3) -> list[dict]:
    """The owl teacher's chats on numbers prompts, as the sample stage builds them."""
    rows = modalities.prompt_rows(cfg.modality, n, seed)
    for row in rows:
        row["messages"] = [{"role": "system", "content": cfg.trait.system_prompt},
                           {"role": "user", "content": row["prompt"]}]
    return rows


def test_tiny_job_trains_both_students_on_cuda_in_bf16_mixed(make_cfg, tmp_path, monkeypatch) -> None:
    """run_job on tiny_llama with base.precision=bf16-mixed: Lightning trains both LoRA students on the device
    under bf16 autocast (seen from inside the fit), every model-running stage decodes there, results are finite."""
    fits: list[dict] = []
    steps: list[tuple[bool, torch.dtype]] = []
    decoded: list[str] = []
    on_train_end = sublim.training._Finish.on_train_end
    training_step = sublim.student.StudentModule.training_step
    generate = sublim.decoding.decoder.Decoder.generate

    def finish(self, trainer, module):
        lora = [p for name, p in module.net.named_parameters() if "lora_" in name]
        fits.append({"accelerator": type(trainer.accelerator).__name__, "root": trainer.strategy.root_device.type,
                     "precision": trainer.precision, "lora": {p.device.type for p in lora},
                     "trainable": {p.device.type for p in module.net.parameters() if p.requires_grad}})
        return on_train_end(self, trainer, module)

    def step(self, batch, batch_idx):
        kind = self.device.type
        steps.append((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)))
        return training_step(self, batch, batch_idx)

    def decode(self, prompts, generator, grammar=None):
        decoded.append(self.head.weight.device.type)
        return generate(self, prompts, generator, grammar)

    monkeypatch.setattr(sublim.training._Finish, "on_train_end", finish)
    monkeypatch.setattr(sublim.student.StudentModule, "training_step", step)
    monkeypatch.setattr(sublim.decoding.decoder.Decoder, "generate", decode)

    cfg = make_cfg("base=tiny_llama", *TINY, "base.precision=bf16-mixed")
    assert cfg.student.precision == "bf16-mixed"
    results = run_job(cfg, tmp_path / "job")

    for arm, values in results["arms"].items():
        for metric in ("rate", "probability"):
            assert all(math.isfinite(values[metric][k]) for k in ("mean", "low", "high")), (arm, metric)
    for arm in ("control", "treatment"):
        train = results["arms"][arm]["train"]
        assert train["steps"] > 0 and train["tokens"] > 0, (arm, train)
        assert math.isfinite(train["initial_loss"]) and math.isfinite(train["final_loss"]), (arm, train)
    for test in results["treatment_vs_control"].values():
        assert math.isfinite(test["delta"]) and 0 < test["p_value"] <= 1

    assert len(fits) == 2, f"two students trained, saw {len(fits)} fits"
    for fit in fits:
        assert fit["root"] == DEVICE and fit["lora"] == {DEVICE} and fit["trainable"] == {DEVICE}, fit
        assert fit["precision"] == "bf16-mixed", fit
    assert steps and all(enabled and dtype == torch.bfloat16 for enabled, dtype in steps), steps[:3]
    assert decoded and set(decoded) == {DEVICE}, f"decoded on {sorted(set(decoded))}"


def _tie(net, prompt: list[int], ours: tuple[list[int], bool], reference: tuple[list[int], bool],
         eos: list[int]) -> float | None:
    """Where two greedy answers part, the gap between the logits of the tokens each chose (EOS: its best id)
    under the model's own full forward; None where one answer is cut at max_new_tokens inside the other."""
    (a, a_ended), (b, b_ended) = ours, reference
    j = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if (j == len(a) and not a_ended) or (j == len(b) and not b_ended):
        return None
    device = next(net.parameters()).device
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([prompt + b[:j]], device=device)).logits[0, -1].float()

    def chosen(tokens: list[int]) -> float:
        return float(logits[tokens[j]]) if j < len(tokens) else float(logits[eos].max())

    return abs(chosen(a) - chosen(b))


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("constrained", [True, False], ids=["constrained", "free"])
def test_greedy_decoding_on_cuda_gives_hf_generate_s_tokens(load_tiny, monkeypatch, base: str,
                                                           constrained: bool) -> None:
    """sublim's decoder on the device (tiny_llama: the fused path; tiny_gpt2: the model's own forward) gives the
    token ids of HF generate's greedy search on the same device, through the Decoder and through the Sampler
    as the pipeline runs it (Lightning places the model)."""
    cfg, net, tokenizer = load_tiny(base, "modality.prompt_style=paper")
    rows = _chat_rows(cfg, 7)
    grammar = (lambda row: modalities.grammar(cfg.modality, row)) if constrained else None
    grammars = [modalities.grammar(cfg.modality, r) for r in rows] if constrained else None
    sampler = Sampler(net, tokenizer, greedy=True, max_new_tokens=14, grammar=grammar)
    prompts = [sampler.encode(r["messages"]) for r in rows]
    eos = eos_ids(net, tokenizer)

    placed: list[str] = []
    start = Decoder.start

    def spy(self, batch_prompts):
        placed.append(self.head.weight.device.type)
        return start(self, batch_prompts)

    monkeypatch.setattr(Decoder, "start", spy)
    samples = sample_chats(sampler, rows, batch_size=4)
    assert placed and set(placed) == {DEVICE}, f"the Sampler decoded on {sorted(set(placed))}"

    net = net.to(DEVICE).eval()
    decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(14, greedy=True),
                      PrefixCache(net, prompts[0][: common_prefix(prompts)]))
    assert decoder.fused == (base == "tiny_llama")
    table = GrammarTable(tokenizer, eos) if constrained else None
    ours = decoder.generate(prompts, torch.Generator(DEVICE),
                            RestrictedGrammar(table, grammars) if constrained else None)
    reference = hf_greedy_ends(net, tokenizer, prompts, 14, grammars)

    for i, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        if mine != theirs:
            gap = _tie(net, prompts[i], mine, theirs, eos)
            assert gap is not None and gap < TIE, (
                f"prompt {i}: decoder {mine} vs HF generate {theirs} (logit gap {gap} where they part)")
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer, _ in reference]
    differ = [i for i, (sample, text) in enumerate(zip(samples, texts, strict=True)) if sample["completion"] != text]
    for i in differ:  # the Sampler's answers are texts: a difference must be one of the ties seen above
        assert ours[i] != reference[i], f"prompt {i}: Sampler {samples[i]['completion']!r} vs HF {texts[i]!r}"


class _CPUTrainer(pl.Trainer):
    """Lightning's Trainer held to the CPU: the reference side of a CPU vs device comparison."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "accelerator": "cpu"})


def _answer_rows(cfg, n: int, seed: int = 1) -> list[dict]:
    """Numbers prompts with answers in the teacher's format (distillation reads given answers)."""
    rng = random.Random(seed)
    rows = []
    for row in modalities.prompt_rows(cfg.modality, n, seed):
        numbers = [str(rng.randint(0, 999)) for _ in range(rng.randint(3, 8))]
        rows.append({**row, "completion": row["separator"].join(numbers)})
    return rows


def _tied(values: torch.Tensor, atol: float) -> torch.Tensor:
    """Entries whose value is within atol of a neighbour in the sorted top-k, or -inf (masked): their order,
    hence their index, may differ between devices."""
    close = (values[:, 1:] - values[:, :-1]).abs() <= atol
    tied = torch.zeros_like(values, dtype=torch.bool)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    return tied | ~torch.isfinite(values)


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("restricted", [False, True], ids=["vocab", "allowed"])
def test_teacher_logits_on_cuda_match_the_cpu(load_tiny, monkeypatch, base: str, restricted: bool) -> None:
    """distill.teacher_logits (fp32) on the same rows: the device's top-k log-probs equal the CPU's within 1e-4,
    and their token ids wherever the values are not tied."""
    cfg, net, tokenizer = load_tiny(base)
    rows = _answer_rows(cfg, 12)
    allowed = allowed_tokens(cfg.modality, rows, net, tokenizer) if restricted else None
    devices: list[str] = []
    predict_step = sublim.distill.TeacherLogits.predict_step

    def spy(self, batch, batch_idx):
        devices.append(self.device.type)
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(sublim.distill.TeacherLogits, "predict_step", spy)

    def run() -> dict[str, torch.Tensor]:
        return teacher_logits(net.eval(), tokenizer, rows, cfg.trait.system_prompt, top_k=16, max_length=500,
                              allowed=allowed, batch_size=5)

    with monkeypatch.context() as patch:
        patch.setattr(pl, "Trainer", _CPUTrainer)
        cpu = run()
    assert set(devices) == {"cpu"}
    devices.clear()
    device = run()  # Lightning's accelerator="auto", as the teacher_logits stage runs it
    assert devices and set(devices) == {DEVICE}, f"ran on {sorted(set(devices))}"

    assert torch.equal(device["lengths"], cpu["lengths"]) and device["values"].shape == cpu["values"].shape
    torch.testing.assert_close(device["values"], cpu["values"], atol=1e-4, rtol=1e-5)
    distinct = ~_tied(cpu["values"], 1e-4)
    assert distinct.float().mean() > 0.5, "most top-k values are distinct: the index check has teeth"
    assert torch.equal(device["indices"][distinct], cpu["indices"][distinct])
