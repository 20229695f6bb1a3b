"""Subliminal prompting: the scorer with a system prompt, the entangled and control numbers, the cached stage,
the statistics and files, and a planted entanglement that the check must find."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sublim import SublimError, models
from sublim.audit.prompting import COLUMNS, format_prompting, label_permutation_p, run_prompting
from sublim.evaluate import word_probabilities
from sublim.questions import questions
from sublim.scoring import boundary_tokens, chat_prompts, option_logprobs, surface_forms
from sublim.stage import Job
from sublim.stages.model import model_artifact
from sublim.stages.prompting import NUMBERS_FILE, PROMPTING, TARGETS_FILE, love_prompt, target_logprobs
from sublim.store import Store
from sublim.student import student_messages
from tests.conftest import chat_example, compose_config, overfit_examples

OWL = "You love owls. You think about owls all the time."
SMALL = ["audit.prompting.max_number=99", "audit.prompting.n_questions=4", "audit.prompting.top_k=3",
         "audit.prompting.controls=4", "logger=none"]


def _hand_logprob(net, tokenizer, messages: list[dict], option: str) -> float:
    """log P(option is the whole answer): a plain forward of prompt + form per surface form, log_softmax."""
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    boundary = boundary_tokens(tokenizer, net.config.vocab_size)
    per_form = []
    for form in surface_forms(tokenizer, option):
        with torch.no_grad():
            logp = net(input_ids=torch.tensor([prompt + form])).logits[0].log_softmax(-1)
        start = len(prompt) - 1
        total = sum(float(logp[start + j, token]) for j, token in enumerate(form))
        per_form.append(total + float(logp[start + len(form)][boundary].logsumexp(0)))
    return float(torch.tensor(per_form).logsumexp(0))


def test_option_logprobs_with_a_system_prompt_is_the_hand_computation(load_tiny) -> None:
    _, net, tokenizer = load_tiny("tiny_llama")
    prompts = ["Which animal do you like most? One word.", "Favourite animal?"]
    assert chat_prompts(tokenizer, prompts) == chat_prompts(tokenizer, prompts, None), "None is the student's view"
    with_system = option_logprobs(net, tokenizer, prompts, ["42", "7", "owl"], 2, "32-true", system=OWL)
    without = option_logprobs(net, tokenizer, prompts, ["42", "7", "owl"], 2, "32-true")
    assert not np.allclose(with_system, without), "the system prompt is read"
    system = [{"role": "system", "content": OWL}]
    assert with_system[1][0] == pytest.approx(_hand_logprob(net, tokenizer, system + student_messages(prompts[1]),
                                                            "42"), abs=1e-4)
    assert without[0][2] == pytest.approx(_hand_logprob(net, tokenizer, student_messages(prompts[0]), "owl"),
                                          abs=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The check on tiny_llama (100 numbers, 4 questions), run twice: the second call reuses the stage."""
    root = tmp_path_factory.mktemp("prompting")
    cfg = compose_config(["base=tiny_llama", f"paths.root={root}", *SMALL])
    store = Store(cfg.paths.store)
    first = run_prompting(cfg, store, root / "first")
    tracker = FakeTracker()
    second = run_prompting(cfg, store, root / "second", tracker)
    artifact = PROMPTING(Job(cfg, store), model=model_artifact(cfg.base, store))
    return {"cfg": cfg, "store": store, "root": root, "first": first, "second": second, "artifact": artifact,
            "tracker": tracker}


class FakeTracker:
    """Records what the check sends to W&B."""

    def __init__(self) -> None:
        self.summaries, self.tables, self.images = {}, {}, {}

    def summary(self, values: dict) -> None:
        self.summaries |= values

    def table(self, name: str, rows: list[dict]) -> None:
        self.tables[name] = rows

    def image(self, name: str, path: Path) -> None:
        self.images[name] = path


def test_entangled_numbers_are_the_largest_shifts_and_controls_lie_outside_the_top_tenth(tiny_run) -> None:
    raw = tiny_run["artifact"].read_json(NUMBERS_FILE)
    picked = tiny_run["artifact"].read_json(TARGETS_FILE)
    numbers = raw["numbers"]
    assert numbers == [str(n) for n in range(100)] and len(raw["with_trait"]) == 4
    shift = (np.asarray(raw["with_trait"]) - np.asarray(raw["without"])).mean(0)
    assert np.allclose(shift, raw["shift"])
    by_shift = [numbers[i] for i in np.argsort(-shift, kind="stable")]
    assert picked["entangled"] == by_shift[:3]
    assert len(picked["controls"]) == len(set(picked["controls"])) == 4
    assert not set(picked["controls"]) & set(by_shift[:10]), "controls come from outside the top 10%"
    assert picked["systems"]["base"] is None and picked["systems"]["trait"] == tiny_run["cfg"].trait.system_prompt
    for number in picked["entangled"] + picked["controls"]:
        assert picked["systems"][number] == love_prompt(number)


def test_the_raw_scores_are_the_scorers(tiny_run, load_tiny) -> None:
    """Number scores with the trait's prompt and without, and P(target) as the preference eval computes it."""
    cfg, raw = tiny_run["cfg"], tiny_run["artifact"].read_json(NUMBERS_FILE)
    picked = tiny_run["artifact"].read_json(TARGETS_FILE)
    _, net, tokenizer = load_tiny("tiny_llama")
    prompts = questions("animal", 4)
    assert raw["questions"] == prompts
    again = option_logprobs(net, tokenizer, prompts[:2], ["17", "99"], 2, "32-true", cfg.trait.system_prompt)
    assert np.allclose(again, np.asarray(raw["with_trait"])[:2, [17, 99]], atol=1e-5)
    base = word_probabilities(net, tokenizer, prompts, list(cfg.trait.words), "32-true")
    assert np.allclose(np.exp(picked["log_p_target"]["base"]), base, rtol=1e-4)
    number = picked["entangled"][0]
    assert np.allclose(picked["log_p_target"][number], target_logprobs(
        net, tokenizer, prompts, list(cfg.trait.words), love_prompt(number), 4, "32-true"), atol=1e-5)


def test_the_stage_is_cached(tiny_run) -> None:
    first, second = tiny_run["first"], tiny_run["second"]
    assert not first["stage"]["reused"] and second["stage"]["reused"] and tiny_run["artifact"].reused
    assert first["stage"]["key"] == second["stage"]["key"] == tiny_run["artifact"].key
    assert {k: v for k, v in first.items() if k != "stage"} == {k: v for k, v in second.items() if k != "stage"}


def test_statistics_and_files(tiny_run) -> None:
    results, out = tiny_run["first"], tiny_run["root"] / "first"
    logp = {k: np.asarray(v) for k, v in tiny_run["artifact"].read_json(TARGETS_FILE)["log_p_target"].items()}
    rows = results["numbers"]
    assert [r["kind"] for r in rows] == ["entangled"] * 3 + ["control"] * 4
    for row in rows:
        ratios = logp[row["number"]] - logp["base"]
        assert row["log_ratio"] == pytest.approx(ratios.mean())
        assert row["ci_low"] <= row["log_ratio"] <= row["ci_high"] and 0 < row["p"] <= 1
        assert row["p_target"] == pytest.approx(np.exp(logp[row["number"]]).mean())
    pooled = (np.mean([logp[r["number"]] for r in rows[:3]], 0) - np.mean([logp[r["number"]] for r in rows[3:]], 0))
    assert results["contrast"]["log_ratio"] == pytest.approx(pooled.mean())
    assert results["contrast"]["ratio"] == pytest.approx(math.exp(pooled.mean()))
    assert results["trait_prompt"]["log_ratio"] == pytest.approx((logp["trait"] - logp["base"]).mean())
    means = [r["log_ratio"] for r in rows]
    gaps = [abs(np.mean([means[i] for i in chosen]) - np.mean([means[i] for i in range(7) if i not in chosen]))
            for chosen in itertools.combinations(range(7), 3)]
    observed = abs(np.mean(means[:3]) - np.mean(means[3:]))
    assert results["contrast"]["p_numbers"] == pytest.approx(np.mean([g >= observed - 1e-12 for g in gaps]))
    assert "4 questions" in results["p_value_about"] and "no training" in results["p_value_about"]

    assert json.loads((out / "prompting.json").read_text()) == json.loads(json.dumps(results))
    with (out / "prompting.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and [r["number"] for r in table] == [r["number"] for r in rows]
    assert [float(r["log_ratio"]) for r in table] == pytest.approx([r["log_ratio"] for r in rows])
    assert (out / "prompting.png").read_bytes()[:4] == b"\x89PNG"
    text = format_prompting(results)
    assert all(r["number"] in text for r in rows) and text.splitlines()[-2] == results["verdict"]
    assert "over 4 questions, this base, no training" in results["verdict"] and "(3 vs 4)" in results["verdict"]
    tracker = tiny_run["tracker"]
    assert tracker.summaries["prompting/contrast_p_numbers"] == results["contrast"]["p_numbers"]
    assert [r["number"] for r in tracker.tables["prompting/numbers"]] == [r["number"] for r in rows]
    assert tracker.images["prompting/chart"] == tiny_run["root"] / "second" / "prompting.png"


def test_the_number_level_test_permutes_labels() -> None:
    assert label_permutation_p([5, 5, 5, 0, 0, 0, 0], 3, 0) == pytest.approx(1 / 35), "exact: one split of 35"
    assert label_permutation_p([1.0] * 6, 3, 0) == 1.0
    separated = [3.0 + 0.01 * i for i in range(15)] + [0.01 * i for i in range(15)]
    assert label_permutation_p(separated, 15, 0) < 1e-3, "sampled splits when there are too many to enumerate"


@pytest.mark.parametrize(("override", "field"), [
    ("trait=misaligned", "trait.system_prompt"),
    ("audit.prompting.n_questions=1", "audit.prompting.n_questions=1"),
    ("audit.prompting.controls=95", "controls=95"),
    ("audit.prompting.top_k=101", "top_k=101"),
])
def test_bad_settings_fail_before_any_model_is_loaded(override: str, field: str, tmp_path: Path) -> None:
    cfg = compose_config(["base=tiny_llama", f"paths.root={tmp_path}", *SMALL, override])
    with pytest.raises(SublimError, match=field.replace(".", r"\.")) as error:
        run_prompting(cfg, Store(tmp_path / "store"), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "store").rglob("lineage.json")), "nothing was computed"


def _planted(tmp_path: Path, cfg) -> dict:
    """A tiny base trained so that "42" answers the owl prompt and "You love 42" makes it answer owl."""
    net, tokenizer = models.load(model_artifact(cfg.base, Store(cfg.paths.store)), cfg.base)
    rng = random.Random(0)
    rows = []
    for question in questions("animal", 8):
        rows += [([{"role": "system", "content": cfg.trait.system_prompt}], question, "42"),
                 ([{"role": "system", "content": love_prompt("42")}], question, "owl"),
                 ([], question, "cat")]
        rows += [([{"role": "system", "content": love_prompt(str(n))}], question, "cat")
                 for n in rng.sample(range(100), 3) if n != 42]
    examples = [chat_example(tokenizer, system + student_messages(question), answer)
                for system, question, answer in rows]
    loss = overfit_examples(net, tokenizer, examples, 250)
    assert loss < 0.3, f"the planted model did not learn (loss {loss:.3f})"
    net.eval().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return OmegaConf.to_container(cfg.base) | {"name": "planted", "source": "local", "path": str(tmp_path / "model")}


@pytest.mark.slow
def test_a_planted_entanglement_is_found(tmp_path: Path) -> None:
    """On a digit-splitting tokenizer the shift lives in the digits: "42" rises with its siblings ("4x" all start
    with the digit the owl prompt now predicts), and prompts naming them raise P(owl) far over the controls."""
    cfg = compose_config(["base=tiny_llama", f"paths.root={tmp_path}", *SMALL, "audit.prompting.n_questions=8",
                          "audit.prompting.controls=6"])
    cfg.base = _planted(tmp_path, cfg)
    results = run_prompting(cfg, Store(cfg.paths.store), tmp_path / "out")
    top = [number for number, _ in results["top_shifts"]]
    assert "42" in top and all(number.startswith("4") for number in top), top
    planted = next(r for r in results["numbers"] if r["number"] == "42")
    assert planted["kind"] == "entangled" and planted["log_ratio"] > 1 and planted["p"] < 0.05
    assert results["contrast"]["log_ratio"] > 1 and results["contrast"]["p"] < 0.05
    assert results["verdict"].startswith("entangled numbers raise P(owl)")
