"""The decoder: same logits and greedy tokens as HF generate, prefix sharing, restricted head, top-p."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from sublim import modalities
from sublim.decoding import Decoder, Decoding, PrefixCache, RestrictedGrammar, common_prefix
from sublim.models import eos_ids
from sublim.teacher import GrammarConstraint, GrammarTable, Sampler, sample_chats
from tests.test_teacher import _rows


def test_common_prefix_leaves_every_prompt_a_token() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix([[7], [7, 8]]) == 0
    assert common_prefix([]) == 0


def _hf_greedy(net, tokenizer, prompts: list[list[int]], max_new_tokens: int, grammars=None) -> list[list[int]]:
    """One prompt at a time (no padding): the reference tokens."""
    eos = eos_ids(net, tokenizer)
    out = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        processors = LogitsProcessorList()
        if grammars is not None:
            processors.append(GrammarConstraint(GrammarTable(tokenizer, eos), [grammars[i]], ids.shape[1]))
        generated = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, logits_processor=processors, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        out.append(generated[: next((j for j, t in enumerate(generated) if t in eos), len(generated))])
    return out


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


def test_restricted_head_logits_equal_the_full_head(load_tiny) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama")
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11]]
    eos = eos_ids(net, tokenizer)
    prefix = PrefixCache(net, prompts[0][:3])
    decoder = Decoder(net, eos, tokenizer.pad_token_id, Decoding(4), prefix)
    grammar = RestrictedGrammar(GrammarTable(tokenizer, eos), [modalities.grammar(cfg.modality, {"separator": ","})])
    ids = torch.tensor([prompts[0][3:]])
    mask = torch.ones((1, 6), dtype=torch.long)
    positions = torch.arange(3, 6).unsqueeze(0)
    with torch.no_grad():
        restricted = decoder._logits(ids, mask, positions, prefix.batch(1), grammar.ids)
        full = net(input_ids=torch.tensor([prompts[0]])).logits[:, -1]
    torch.testing.assert_close(restricted, full[:, grammar.ids], rtol=1e-4, atol=1e-4)


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
