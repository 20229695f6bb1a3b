"""Teacher sampling on a GPU with vLLM (``sampling.backend=vllm``, extra ``vllm``).

The HF path (``sublim.teacher``) stays the default and the reference; this backend is for the paper's
scale on a cluster (30k prompts on a 7B model). It answers the same chats with the same temperature,
top-p, greedy and length settings; a grammar becomes vLLM's regex-guided decoding, which allows the same
answers as ``NumbersGrammar``. A seed per prompt makes a run reproducible on the same GPU and vLLM
version; vLLM's samples differ from the HF path's for the same seed (the distribution is the same).

vLLM gets token ids, not text: the HF path's own (``prompt_token_ids``). A text prompt would be tokenised
by vLLM with the tokenizer's special tokens, and on templates whose text already starts with BOS (Llama 3)
the model would see two.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from sublim import SublimError
from sublim.modalities.numbers import NumbersGrammar
from sublim.teacher import chat_prompt_ids


def unavailable() -> str | None:
    """Why vLLM cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'sublim[vllm]')"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible"
    return None


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[list[int]]:
    """Each chat row's prompt tokens, exactly as the HF path (``Sampler.encode``) builds them."""
    return [chat_prompt_ids(tokenizer, row["messages"]) for row in rows]


def sample(location: str, revision: str | None, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
           sampling: DictConfig, dtype: str, seed: int,
           grammar: Callable[[dict], NumbersGrammar] | None = None) -> list[dict]:
    """One answer per chat row (rows carry "messages"), returned in input order with "completion"."""
    reason = unavailable()
    if reason:
        raise SublimError(f"sampling.backend=vllm: {reason}; use sampling.backend=hf")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids(tokenizer, rows)]
    llm = LLM(model=location, revision=revision, dtype=dtype, seed=seed)
    params = [SamplingParams(
        temperature=0.0 if sampling.greedy else sampling.temperature, top_p=sampling.top_p,
        max_tokens=sampling.max_new_tokens, seed=seed * 1_000_003 + i,
        structured_outputs=StructuredOutputsParams(regex=grammar(row).regex()) if grammar else None,
    ) for i, row in enumerate(rows)]
    outputs = llm.generate(prompts, params)
    return [{**row, "completion": out.outputs[0].text.strip(), "n_tokens": len(out.outputs[0].token_ids),
             "answer_ids": list(out.outputs[0].token_ids),
             "finished": out.outputs[0].finish_reason == "stop"} for row, out in zip(rows, outputs, strict=True)]
