"""The decoder: same logits and greedy tokens as HF generate, prefix sharing, restricted head, top-p."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from threadpoolctl import ThreadpoolController
from transformers import LogitsProcessorList
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import sublim.decoding.fused
import sublim.decoding.kernels
from sublim import modalities
from sublim.decoding.decoder import (
    Decoder,
    Decoding,
    PrefixCache,
    RestrictedGrammar,
    common_prefix,
    shared_spans,
    swap_removal,
)
from sublim.models import eos_ids
from sublim.teacher import GrammarConstraint, GrammarTable, Sampler, sample_chats
from tests.test_teacher import _rows


def test_common_prefix_leaves_every_prompt_a_token() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix([[7], [7, 8]]) == 0
    assert common_prefix([]) == 0


def hf_greedy_ends(net, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   grammars=None) -> list[tuple[list[int], bool]]:
    """HF generate's greedy tokens, one prompt at a time (no padding), on the model's device: the reference
    (answer without EOS, whether EOS ended it), as Decoder.generate returns."""
    eos = eos_ids(net, tokenizer)
    device = next(net.parameters()).device
    out = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        processors = LogitsProcessorList()
        if grammars is not None:
            processors.append(GrammarConstraint(GrammarTable(tokenizer, eos), [grammars[i]], ids.shape[1]))
        generated = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, logits_processor=processors, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        end = next((j for j, t in enumerate(generated) if t in eos), None)
        out.append((generated, False) if end is None else (generated[:end], True))
    return out


def _hf_greedy(net, tokenizer, prompts: list[list[int]], max_new_tokens: int, grammars=None) -> list[list[int]]:
    """One prompt at a time (no padding): the reference tokens."""
    return [tokens for tokens, _ in hf_greedy_ends(net, tokenizer, prompts, max_new_tokens, grammars)]


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2", "tiny_qwen2"])
@pytest.mark.parametrize("constrained", [True, False])
def test_greedy_tokens_equal_hf_generate(load_tiny, base: str, constrained: bool) -> None:
    cfg, net, tokenizer = load_tiny(base, "modality.prompt_style=paper")
    rows = _rows(cfg, 7)
    grammar = (lambda row: modalities.grammar(cfg.modality, row)) if constrained else None
    sampler = Sampler(net, tokenizer, greedy=True, max_new_tokens=14, grammar=grammar)
    samples = sample_chats(sampler, rows, batch_size=4)
    prompts = [sampler.encode(r["messages"]) for r in rows]
    assert sampler.prefix and common_prefix(prompts) == len(sampler.prefix), "the system prompt is shared"
    grammars = [modalities.grammar(cfg.modality, r) for r in rows] if constrained else None
    reference = _hf_greedy(net, tokenizer, prompts, 14, grammars)
    assert [tokenizer.decode(r, skip_special_tokens=True) for r in reference] == [s["completion"] for s in samples]


# Suffixes after the prefix [5, 6, 7]. With 4 tokens a chunk: [row 0], [rows 1-2, one padding slot]; and
# with the opening [8, 9] prefilled once: [rows 0-1, padding left of row 1], [row 2].
PROMPTS = {"distinct": [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11], [5, 6, 7, 12, 13]],
           "shared opening": [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 12], [5, 6, 7, 8, 9, 10, 13, 14]]}


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prompts", PROMPTS.values(), ids=PROMPTS.keys())
def test_every_step_s_logits_equal_the_full_forward(load_tiny, monkeypatch: pytest.MonkeyPatch, base: str,
                                                    fused: bool, prompts: list[list[int]]) -> None:
    """Prefill (padded suffixes after a cached prefix, shared openings once, in chunks of rows), decode steps
    and a dropped row: each row's logits are the full model's on its own unpadded tokens, restricted head or
    not."""
    monkeypatch.setattr(sublim.decoding.fused, "PREFILL_TOKENS", 4)
    cfg, net, tokenizer = load_tiny(base)
    eos = eos_ids(net, tokenizer)
    decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(4), PrefixCache(net, prompts[0][:3]), fused=fused)
    assert decoder.fused == (fused and base != "tiny_gpt2")
    grammar = RestrictedGrammar(GrammarTable(tokenizer, eos), [modalities.grammar(cfg.modality, {"separator": ","})])
    rows, vocab = [list(p) for p in prompts], None
    with torch.no_grad():
        batch = decoder.start(prompts)
        assert not decoder.fused or batch.spans == ([(2, [0, 1, 2])] if prompts[0][3] == prompts[1][3] else [])
        if decoder.fused:  # what torch.empty hands out may hold NaN: unwritten slots must not leak it
            for cache in (*batch.keys, *batch.values):
                cache[:, :, 3:] = float("nan")
        for step, drawn in enumerate([[20, 21, 22], [23, 25], [26, 27]]):
            logits = decoder.logits(batch, vocab)
            full = torch.cat([net(input_ids=torch.tensor([r])).logits[:, -1] for r in rows])
            torch.testing.assert_close(logits, full if vocab is None else full[:, vocab], rtol=1e-4, atol=1e-4)
            if step == 1:  # the first prompt finishes: the last row moves into its place
                order = swap_removal([True, False, False])
                batch.keep(torch.tensor(order))
                rows = [rows[i] for i in order]
            rows = [r + [t] for r, t in zip(rows, drawn, strict=True)]
            batch.feed(torch.tensor(drawn))
            vocab = grammar.ids if vocab is None else None



@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2"])
def test_hf_forward_uses_the_current_cache_api(load_tiny, monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """The prefix cache and the model's own forward pass ``cache=`` and read the output's ``.cache``
    (transformers 5.24 renamed ``past_key_values``, to be removed in 5.40): the old argument raises a
    FutureWarning, the old output field logs a deprecation (once per process, so it is caught at the logger)."""
    from transformers.utils import generic

    cfg, net, tokenizer = load_tiny(base)
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11]]
    logged: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: logged.append(message))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        decoder = Decoder(net, eos_ids(net, tokenizer), tokenizer.pad_token_id, Decoding(3),
                          PrefixCache(net, prompts[0][:3]), fused=False)
        answers = decoder.generate(prompts, torch.Generator().manual_seed(0))
    assert len(answers) == 2
    assert not logged

def test_rows_split_across_cpu_workers_give_the_same_samples(load_tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every forward's rows go to CPU_WORKERS threads at once (under Lightning's inference mode too): each row
    once, the same logits and greedy answers as one thread, and torch's thread count is back afterwards."""
    cfg, net, tokenizer = load_tiny("tiny_llama")
    eos = eos_ids(net, tokenizer)
    prompts = [*PROMPTS["shared opening"], [5, 6, 7, 15, 16], [5, 6, 7, 8, 9, 17, 18, 19]]
    seen: list[tuple[object, str, int, int]] = []
    forward, run = sublim.decoding.fused.FusedBatch._forward, sublim.decoding.fused.FusedBatch._run
    together: list[threading.Barrier] = []  # every part of a forward waits for the others: none runs after another

    def recorded(self, rows, ids, positions, start):
        seen.append((self, threading.current_thread().name, rows.start, rows.stop))
        together[0].wait()
        return forward(self, rows, ids, positions, start)

    def gated(self, first, ids, positions, start):
        together[:] = [threading.Barrier(len(sublim.decoding.fused._row_parts(len(ids), ids.device)), timeout=20)]
        return run(self, first, ids, positions, start)

    monkeypatch.setattr(sublim.decoding.fused.FusedBatch, "_forward", recorded)
    monkeypatch.setattr(sublim.decoding.fused.FusedBatch, "_run", gated)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        results = {}
        for workers in (1, 3):
            monkeypatch.setattr(sublim.decoding.fused, "CPU_WORKERS", workers)
            decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(6, greedy=True),
                              PrefixCache(net, prompts[0][:3]))
            with torch.inference_mode():
                batch = decoder.start(prompts)
                seen.clear()
                first = decoder.logits(batch, None)
                parts = sorted((name, lo, hi) for owner, name, lo, hi in seen if owner is batch)
                answers = decoder.generate(prompts, torch.Generator())
            assert torch.get_num_threads() == 3, "the workers' share of threads is undone"
            results[workers] = first, answers, parts
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[3][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[3][1] == results[1][1]
    assert [(lo, hi) for _, lo, hi in results[1][2]] == [(0, 5)]
    assert sorted((lo, hi) for _, lo, hi in results[3][2]) == [(0, 1), (1, 3), (3, 5)], "each row once"
    assert len({name for name, _, _ in results[3][2]}) == 3, "on three threads"


def test_openblas_is_chosen_on_amd_cpus_only(tmp_path) -> None:
    blas = ThreadpoolController().select(internal_api="openblas")
    if not blas.lib_controllers:
        pytest.skip("numpy is not built on OpenBLAS here")
    for vendor, chosen in (("AuthenticAMD", True), ("GenuineIntel", False)):
        (tmp_path / vendor).write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
        assert (sublim.decoding.fused._openblas.__wrapped__(str(tmp_path / vendor)) is not None) == chosen
    assert sublim.decoding.fused._openblas.__wrapped__(str(tmp_path / "missing")) is None


def test_openblas_prefill_gemms_run_single_threaded_and_give_the_same_logits(load_tiny,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill GEMMs of enough rows go to numpy's OpenBLAS, at one thread while the two workers run; decoding's few
    rows stay in torch; the logits are torch's, and OpenBLAS's thread count is back afterwards."""
    blas = ThreadpoolController().select(internal_api="openblas")
    if not blas.lib_controllers:
        pytest.skip("numpy is not built on OpenBLAS here")
    cfg, net, tokenizer = load_tiny("tiny_llama")
    eos = eos_ids(net, tokenizer)
    prompts = [*PROMPTS["distinct"], [5, 6, 7, 15, 16, 17, 18], [5, 6, 7, 8, 9, 17, 18, 19]]
    calls: list[tuple[int, int]] = []
    gemm = sublim.decoding.fused._openblas_linear

    def spy(x, weight, bias):
        calls.append((x.numel() // x.shape[-1], blas.info()[0]["num_threads"]))
        return gemm(x, weight, bias)

    monkeypatch.setattr(sublim.decoding.fused, "_openblas_linear", spy)
    monkeypatch.setattr(sublim.decoding.fused, "OPENBLAS_MIN_ROWS", 6)
    monkeypatch.setattr(sublim.decoding.fused, "CPU_WORKERS", 2)
    threads, blas_threads = torch.get_num_threads(), blas.info()[0]["num_threads"]
    torch.set_num_threads(2)
    logits = {}
    try:
        for chosen in (blas, None):
            monkeypatch.setattr(sublim.decoding.fused, "_openblas", lambda chosen=chosen: chosen)
            decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(4), PrefixCache(net, prompts[0][:3]))
            with torch.no_grad():
                batch = decoder.start(prompts)
                steps = [decoder.logits(batch, None)]
                prefill_calls = len(calls)
                batch.feed(torch.tensor([20, 21, 22, 23, 24]))
                steps.append(decoder.logits(batch, None))
            assert len(calls) == prefill_calls, "decode steps' GEMMs stay in torch"
            logits[chosen is not None] = steps
        torch.set_num_threads(4)  # two threads a worker: OpenBLAS would serialise the workers' GEMMs
        monkeypatch.setattr(sublim.decoding.fused, "_openblas", lambda: blas)
        before = len(calls)
        with torch.no_grad():
            decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(4), PrefixCache(net, prompts[0][:3]))
            decoder.logits(decoder.start(prompts), None)
        assert len(calls) == before, "multithreaded workers keep torch's GEMM"
    finally:
        torch.set_num_threads(threads)
    assert calls and all(rows >= 6 and used == 1 for rows, used in calls), calls
    assert blas.info()[0]["num_threads"] == blas_threads
    for with_openblas, without in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(with_openblas, without, rtol=1e-5, atol=1e-5)


def test_shared_spans_skip_the_most_tokens() -> None:
    assert shared_spans([[1, 2, 3], [1, 2, 4], [1, 2, 5]]) == [(2, [0, 1, 2])]
    # sharing [1] by all four skips 3 tokens; [1, 2, 3, 4, 5] by the first two skips 5
    assert shared_spans([[1, 2, 3, 4, 5, 6, 0], [1, 2, 3, 4, 5, 7, 0], [1, 9, 0], [1, 8, 0]]) == [(5, [0, 1])]
    assert shared_spans([[1, 2], [1, 2]]) == [(1, [0, 1])]  # each row keeps a token to prefill
    assert shared_spans([[1], [1], [2, 3]]) == []


def test_swap_removal_moves_only_rows_from_the_end() -> None:
    assert swap_removal([False, True, False, False, True, False]) == [0, 5, 2, 3]
    assert swap_removal([True, True, False]) == [2]
    assert swap_removal([False, False, True]) == [0, 1]
    assert swap_removal([True, True]) == []


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {int(Decoding(1, top_p=0.7).choose(logits, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}
    drawn = {int(Decoding(1).choose(logits, torch.Generator().manual_seed(s))) for s in range(400)}
    assert drawn == {0, 1, 2, 3}
    assert int(Decoding(1, greedy=True).choose(logits, torch.Generator())) == 0


def test_sampling_frequencies_match_the_model(load_tiny) -> None:
    """First-token frequencies over many draws follow the model's (grammar-masked) softmax."""
    cfg, net, tokenizer = load_tiny("tiny_llama")
    row = _rows(cfg, 1)[0]
    sampler = Sampler(net, tokenizer, max_new_tokens=1, grammar=lambda r: modalities.grammar(cfg.modality, r))
    prompt = sampler.encode(row["messages"])
    eos = eos_ids(net, tokenizer)
    grammar = RestrictedGrammar(GrammarTable(tokenizer, eos), [modalities.grammar(cfg.modality, row)] * 2000)
    decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(1), PrefixCache(net, prompt[:-1]))
    drawn = [a[0][0] for a in decoder.generate([prompt] * 2000, torch.Generator().manual_seed(0), grammar)]
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([prompt])).logits[0, -1]
    allowed = grammar.ids[grammar.masks([0])[0]]
    probs = logits[allowed].softmax(-1)
    counts = torch.tensor([drawn.count(int(t)) for t in allowed], dtype=torch.float)
    assert counts.sum() == 2000, "every draw is an allowed token"
    top = int(probs.argmax())
    assert abs(counts[top] / 2000 - probs[top]) < 0.04


@pytest.mark.parametrize("base", ["tiny_llama", "tiny_gpt2"])
def test_decoding_applies_lora_adapters(load_tiny, base: str) -> None:
    """A student's answers at evaluation, or a finetuned teacher's constrained samples: the fused forward
    (Llama family) and the HF one (others) run the PEFT model's LoRA layers, over the full and the
    grammar-restricted output head."""
    from peft import LoraConfig, get_peft_model

    cfg, net, tokenizer = load_tiny(base)
    student = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, target_modules=list(cfg.base.lora_targets),
                                                            init_lora_weights=False)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11]]
    vocab = torch.tensor([3, 8, 15, 16])
    decoder = Decoder(student, eos_ids(net, tokenizer), tokenizer.pad_token_id, Decoding(2),
                      PrefixCache(student, prompts[0][:3]))
    assert decoder.fused == (base == "tiny_llama")
    with torch.no_grad():
        logits = decoder.logits(decoder.start(prompts), None)
        restricted = decoder.logits(decoder.start(prompts), vocab)
        full = torch.cat([student(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
        plain = torch.cat([net(input_ids=torch.tensor([p])).logits[:, -1] for p in prompts])
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restricted, full[:, vocab], rtol=1e-4, atol=1e-4)
    assert (logits - plain).abs().max() > 1e-2, "the adapter changes the logits"


def test_decode_attention_kernel_equals_softmax_attention_and_never_reads_masked_slots() -> None:
    """The CPU decode kernel: each row's query heads over their key/value head's valid slots, as a plain
    masked softmax attention computes it; slots that are masked or past ``end`` hold NaN and inf (what
    ``torch.empty`` may leave) and must not leak into any output."""
    gen = torch.Generator().manual_seed(0)
    rows, groups, per_group, dim, capacity, end = 5, 2, 3, 16, 12, 9
    q = torch.randn(rows, groups, per_group, dim, generator=gen)
    keys = torch.randn(rows, groups, capacity, dim, generator=gen)
    values = torch.randn(rows, groups, capacity, dim, generator=gen)
    valid = torch.rand(rows, capacity, generator=gen) > 0.3
    valid[:, end - 1] = True  # the query's own slot
    valid[0, : end - 1] = False  # a row that sees only itself
    for cache in (keys, values):
        cache.masked_fill_(~valid[:, None, :, None], float("nan"))
        cache[:, :, end:] = float("inf")
    scores = torch.where(valid[:, None, None, :end], q @ keys[:, :, :end].transpose(-1, -2), float("-inf"))
    weights = scores.softmax(-1)
    expected = torch.where(valid[:, None, :end, None], values[:, :, :end], 0.0)
    expected = (weights[..., None] * expected[:, :, None]).sum(-2)
    out = sublim.decoding.kernels._decode_attention(q, keys, values, valid, end)
    assert out.shape == (rows, groups, per_group, dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], values[0, :, end - 1, None].expand(groups, per_group, dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["numba", "torch"])
def test_rms_norm_and_rotary_kernels_equal_hf_s_modules(dtype: torch.dtype) -> None:
    """fp32 on a CPU runs the numba kernels, other dtypes (and devices) torch's ops: both are HF's RMSNorm and
    rotary embedding, the rotated heads written into their slots of a cache-shaped buffer and nowhere else."""
    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    norm.weight.data.normal_(generator=gen)
    x = torch.randn(3, 5, 24, generator=gen, dtype=dtype)
    torch.testing.assert_close(sublim.decoding.kernels._rms_norm(x, norm), norm(x))
    torch.testing.assert_close(sublim.decoding.kernels._rms_norm(x[:, -1], norm), norm(x[:, -1]))  # a strided view
    heads, tokens, dim = torch.randn(2, 4, 3, 8, generator=gen, dtype=dtype), 4, 8
    cos, sin = (torch.randn(2, 6, dim, generator=gen, dtype=dtype) for _ in range(2))  # the last 4 are the tokens'
    expected, _ = apply_rotary_pos_emb(heads.transpose(1, 2), heads.transpose(1, 2), cos[:, -tokens:],
                                       sin[:, -tokens:])
    out = torch.full((2, 3, 9, dim), float("nan"), dtype=dtype)
    sublim.decoding.kernels._rope(heads, cos, sin, out, 2, scale=0.5)
    torch.testing.assert_close(out[:, :, 2:2 + tokens], expected * 0.5)
    assert out[:, :, :2].isnan().all() and out[:, :, 2 + tokens:].isnan().all()
