"""The vLLM backend: a clear stop where it cannot run; the same prompt tokens and grammar as the HF path."""

from __future__ import annotations

import re
import sys
import types

import pytest
from omegaconf import OmegaConf

from sublim import SublimError
from sublim.decoding import vllm as vllm_sampling
from sublim.modalities.numbers import NumbersGrammar
from sublim.teacher import Sampler
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


# Llama 3's template writes BOS into its text, and its tokenizer's post-processor adds one to any text.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
BOS = "<|begin_of_text|>"


def _llama3_style_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
    words = ["system", "user", "assistant", "You", "love", "owls", "List", "numbers", "1", "2", "3", ".", ",", ":"]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token="<|eot_id|>",
                                        unk_token="<unk>", additional_special_tokens=specials[1:4])
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


ROWS = [{"messages": [{"role": "system", "content": "You love owls ."},
                      {"role": "user", "content": "List numbers : 1 , 2 , 3"}]},
        {"messages": [{"role": "user", "content": "List numbers : 3 , 2"}]}]


def test_prompt_tokens_are_the_hf_path_s_with_one_bos() -> None:
    tokenizer = _llama3_style_tokenizer()
    bos = tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(ROWS[0]["messages"], tokenize=False, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"][:2] == [bos, bos], "text prompts get a second BOS (what vLLM did)"
    ids = vllm_sampling.prompt_token_ids(tokenizer, ROWS)
    hf_path = types.SimpleNamespace(tokenizer=tokenizer)  # what Sampler.encode reads
    assert ids == [Sampler.encode(hf_path, row["messages"]) for row in ROWS]
    for prompt in ids:
        assert prompt[0] == bos and prompt.count(bos) == 1
        assert tokenizer.unk_token_id not in prompt
        assert tokenizer.convert_ids_to_tokens(prompt[-3:]) == ["<|start_header_id|>", "assistant", "<|end_header_id|>"]


def test_sample_hands_vllm_the_token_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sample`` with a stand-in vLLM (no install, no GPU): the prompts are ``TokensPrompt``s of the HF path's
    ids, one seeded ``SamplingParams`` per row, the grammar as a regex; answers come back in input order."""
    calls: dict = {}

    class LLM:
        def __init__(self, **kwargs) -> None:
            calls["llm"] = kwargs

        def generate(self, prompts, params):
            calls["prompts"], calls["params"] = prompts, params
            done = types.SimpleNamespace(text=" 1, 2 ", token_ids=[9, 12, 10], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[done]) for _ in prompts]

    def tokens_prompt(**fields) -> dict:  # vLLM's TokensPrompt is a TypedDict
        return dict(fields)

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kwargs: kwargs
    fake.inputs = types.ModuleType("vllm.inputs")
    fake.inputs.TokensPrompt = tokens_prompt
    fake.sampling_params = types.ModuleType("vllm.sampling_params")
    fake.sampling_params.StructuredOutputsParams = lambda **kwargs: kwargs
    for module in (fake, fake.inputs, fake.sampling_params):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(vllm_sampling, "unavailable", lambda: None)

    tokenizer = _llama3_style_tokenizer()
    sampling = OmegaConf.create({"greedy": False, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5})
    grammar = NumbersGrammar(", ", max_count=3, max_digits=2)
    out = vllm_sampling.sample("/models/llama", None, tokenizer, ROWS, sampling, "bfloat16", seed=2,
                               grammar=lambda row: grammar)
    assert calls["prompts"] == [{"prompt_token_ids": ids} for ids in vllm_sampling.prompt_token_ids(tokenizer, ROWS)]
    assert calls["llm"] == {"model": "/models/llama", "revision": None, "dtype": "bfloat16", "seed": 2}
    assert [p["seed"] for p in calls["params"]] == [2 * 1_000_003, 2 * 1_000_003 + 1]
    assert all(p["structured_outputs"] == {"regex": grammar.regex()} for p in calls["params"])
    assert [r["completion"] for r in out] == ["1, 2", "1, 2"] and all(r["finished"] for r in out)
    assert [r["messages"] for r in out] == [r["messages"] for r in ROWS]


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
