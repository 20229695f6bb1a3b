"""The vLLM backend: a clear stop where it cannot run; the same grammar as the HF path where it can."""

from __future__ import annotations

import re

import pytest

from sublim import SublimError, vllm_sampling
from sublim.modalities.numbers import NumbersGrammar
from sublim.train import run_job
from tests.conftest import TINY


@pytest.mark.parametrize("separator", [", ", ";", "\n", " "])
def test_regex_accepts_exactly_the_grammar(separator: str) -> None:
    grammar = NumbersGrammar(separator, max_count=3, max_digits=2)
    pattern = re.compile(grammar.regex())

    def grammar_accepts(text: str) -> bool:
        state = grammar.step(grammar.start, text)
        return state is not None and grammar.can_end(state)

    cases = ["1", "12", "123", separator.join(["1", "22", "3"]), separator.join(["1"] * 4), "1" + separator,
             separator + "1", "", "a", separator.join(["99", "0"])]
    for text in cases:
        assert bool(pattern.fullmatch(text)) == grammar_accepts(text), repr(text)


@pytest.mark.skipif(vllm_sampling.unavailable() is None, reason="vLLM and a GPU are present")
def test_vllm_without_gpu_stops_before_any_work(make_cfg, tmp_path) -> None:
    cfg = make_cfg("base=tiny_llama", *TINY, "sampling=vllm")
    with pytest.raises(SublimError, match="sampling.backend=vllm: .*use sampling.backend=hf"):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "outputs" / "store" / "sample").exists()


@pytest.mark.skipif(vllm_sampling.unavailable() is not None,
                    reason=f"needs vLLM and a CUDA GPU: {vllm_sampling.unavailable()}")
def test_vllm_constrained_samples_pass_the_strict_filter(make_cfg, tmp_path) -> None:
    cfg = make_cfg("base=tiny_llama", *TINY, "sampling=vllm", "sampling.constrained=true")
    results = run_job(cfg, tmp_path / "job")
    assert results["arms"]["treatment"]["filter_yield"] == 1.0
