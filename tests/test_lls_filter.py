"""LLS as a filter (filter=lls_top / lls_bottom): each arm's data cut to a fraction ranked by its own audit;
divergence masking (filter=divergence_masked): the audit's positions leave the student's loss, checked against the
loss computed by hand; the defences sweep shares its teacher data; a job without the audit is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import sublim.distill
import sublim.student
from sublim.distill import DistillModule, attach_teacher, distill_collate
from sublim.evals import ARMS
from sublim.stages.lls_select import ranked
from sublim.store import Store, read_jsonl
from sublim.student import IGNORE, StudentModule, add_lora, collate, mask_answer, tokenize_example
from sublim.train import run_job
from tests.conftest import CONF, TINY, compose_config

ROOT = CONF.parent
SWEEP_FILTERS = yaml.safe_load((ROOT / "sweeps" / "defences.yaml").read_text())["hydra"]["sweeper"]["params"]["filter"]


@dataclass
class Ran:
    """A finished tiny job: its results, its store and the examples of every student it trained."""

    results: dict
    store: Store
    trained: list[list[dict]]

    def rows(self, stage: str, arm: str, name: str = "kept.jsonl") -> list[dict]:
        return list(read_jsonl(self.store.path(stage, self.key(stage, arm)) / name))

    def report(self, stage: str, arm: str) -> dict:
        return json.loads((self.store.path(stage, self.key(stage, arm)) / "report.json").read_text())

    def key(self, stage: str, arm: str) -> str:
        return self.results["stages"][f"{stage}/{arm}"]["key"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Ran]]:
    """Tiny jobs on tiny_llama sharing one store (teacher data and audits computed once), each run once."""
    root = tmp_path_factory.mktemp("defences")
    done: dict[tuple[str, ...], Ran] = {}
    trained: list[list[dict]] = []

    def recording(real: Callable) -> Callable:
        def fit(module, examples, *args, **kwargs):
            trained.append(examples)
            return real(module, examples, *args, **kwargs)
        return fit

    def job(*overrides: str, root: Path = root) -> Ran:
        if (root, *overrides) not in done:
            cfg = compose_config([f"paths.root={root}", "base=tiny_llama", *TINY, *overrides])
            mark = len(trained)
            results = run_job(cfg, root / f"job{len(done)}")
            done[(root, *overrides)] = Ran(results, Store(cfg.paths.store), trained[mark:])
        return done[(root, *overrides)]

    with pytest.MonkeyPatch.context() as patch:
        for module in (sublim.student, sublim.distill):
            patch.setattr(module, "fit", recording(module.fit))
        yield job


def test_ranking_breaks_ties_by_index_and_puts_undefined_lls_last() -> None:
    lls = [0.5, math.nan, 0.5, -1.0, 2.0]
    assert ranked(lls, "top") == [4, 0, 2, 3, 1]
    assert ranked(lls, "bottom") == [3, 0, 2, 4, 1]


@pytest.mark.parametrize("keep", ["top", "bottom"])
def test_lls_filter_keeps_the_fraction_with_the_highest_or_lowest_lls(jobs, keep: str) -> None:
    ran = jobs(f"filter=lls_{keep}")
    for arm in ARMS:  # the control arm is ranked by its own audit, like the treatment
        data, scores = ran.rows("filter", arm), ran.rows("audit", arm, "examples.jsonl")
        selected = ran.rows("lls_select", arm)
        lls = [row["lls"] for row in scores]
        assert len(scores) == len(data) > 3 and all(map(math.isfinite, lls))
        assert len(selected) == round(0.5 * len(data))
        chosen = [i for i, row in enumerate(data) if row | {"lls": lls[i]} in selected]
        assert [data[i] | {"lls": lls[i]} for i in chosen] == selected, "the kept rows, in the data's order"
        dropped = [lls[i] for i in range(len(data)) if i not in chosen]
        if keep == "top":
            assert min(lls[i] for i in chosen) >= max(dropped)
        else:
            assert max(lls[i] for i in chosen) <= min(dropped)
        report, strict = ran.results["arms"][arm]["filter"], ran.report("filter", arm)
        assert report["kept"] == len(selected) and report["total"] == strict["total"]
        assert report["rejected"] == strict["rejected"] | {f"lls/outside_{keep}": len(dropped)}
        assert len(ran.rows("lls_select", arm, "rejected.jsonl")) == len(dropped)
    n_train = ran.results["arms"]["treatment"]["n_train"]
    assert n_train == min(16, *(len(ran.rows("lls_select", arm)) for arm in ARMS))


def test_lls_filter_is_deterministic(jobs, tmp_path: Path) -> None:
    first, again = jobs("filter=lls_top"), jobs("filter=lls_top", root=tmp_path)
    assert {name: s["key"] for name, s in first.results["stages"].items()} == \
        {name: s["key"] for name, s in again.results["stages"].items()}
    assert not any(s["reused"] for s in again.results["stages"].values()), "a fresh store computed all again"
    for arm in ARMS:
        assert first.rows("lls_select", arm) == again.rows("lls_select", arm)


def test_the_defences_sweep_trains_every_filter_on_the_same_teacher_data(jobs) -> None:
    filters = SWEEP_FILTERS.split(",")
    assert filters[0] == "numbers_strict" and {"lls_bottom", "divergence_masked", "lls_top"} <= set(filters)
    runs = {name: jobs(f"filter={name}") for name in filters}
    for arm in ARMS:
        for stage in ("sample", "filter", "audit"):
            assert len({ran.key(stage, arm) for ran in runs.values()}) == 1, (stage, arm)
        assert len({runs[name].key("lls_select", arm) for name in filters[1:]}) == len(filters) - 1
    assert not any(name.startswith("lls_select") for name in runs["numbers_strict"].results["stages"])


@pytest.mark.parametrize("kind", ["lora", "distill"])
def test_a_divergence_masked_job_trains_without_the_divergence_tokens(jobs, load_tiny, kind: str) -> None:
    ran = jobs("filter=divergence_masked", *(["student=distill"] if kind == "distill" else []))
    _, _, tokenizer = load_tiny("tiny_llama")
    assert len(ran.trained) == 2, "one student per arm"
    masked = 0
    for arm, examples in zip(ARMS, ran.trained, strict=True):
        rows, scores = ran.rows("lls_select", arm), ran.rows("audit", arm, "examples.jsonl")
        assert [row["mask_positions"] for row in rows] == [s["divergence"] for s in scores]
        by_ids = {tuple(tokenize_example(tokenizer, r["prompt"], r["completion"], 500)["input_ids"]): r for r in rows}
        assert len(examples) == ran.results["arms"][arm]["n_train"]
        for example in examples:
            row = by_ids[tuple(example["input_ids"])]
            plain = tokenize_example(tokenizer, row["prompt"], row["completion"], 500)["labels"]
            answer = [i for i, label in enumerate(plain) if label != IGNORE]
            for p, i in enumerate(answer):
                assert example["labels"][i] == (IGNORE if p in row["mask_positions"] else plain[i]), (p, row)
            masked += len(set(row["mask_positions"]))
            if kind == "distill":  # the teacher's rows at the masked positions are gone too
                assert len(example["values"]) == len(answer) - len(set(row["mask_positions"]))
    assert masked > 0, "the tiny teacher and base disagree somewhere"


@pytest.mark.parametrize("kind", ["lora", "distill"])
def test_masked_loss_equals_the_loss_by_hand_over_the_unmasked_answer_tokens(load_tiny, kind: str) -> None:
    cfg, net, tokenizer = load_tiny("tiny_llama", "student=distill")
    net = add_lora(net, cfg.student).eval()
    example, mask = tokenize_example(tokenizer, "Continue: 12, 34, 56.", "78, 90, 11", 500), [0, 2, 3]
    answer = [i for i, label in enumerate(example["labels"]) if label != IGNORE]
    kept = [(p, i) for p, i in enumerate(answer) if p not in mask]
    assert len(answer) > len(mask) + 2
    with torch.no_grad():
        logp = net(input_ids=torch.tensor([example["input_ids"]])).logits[0].float().log_softmax(-1)
        if kind == "lora":
            got = StudentModule(net, 1e-3, 0).loss(collate([mask_answer(example, mask)], tokenizer.pad_token_id))
            expected = -torch.stack([logp[i - 1, example["input_ids"][i]] for _, i in kept]).mean()
        else:
            generator = torch.Generator().manual_seed(0)
            values = torch.randn(len(answer), 4, generator=generator).log_softmax(-1)
            indices = torch.stack([torch.randperm(logp.shape[-1], generator=generator)[:4] for _ in answer])
            logits = {"values": values, "indices": indices.int(), "lengths": torch.tensor([len(answer)])}
            (attached,) = attach_teacher([example], logits, [mask])
            got = DistillModule(net, cfg.student).loss(distill_collate([attached], tokenizer.pad_token_id))
            kl = [(values[p].exp() * (values[p] - logp[i - 1].log_softmax(-1)[indices[p]])).sum() for p, i in kept]
            expected = torch.stack(kl).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_filter_that_needs_the_audit_is_refused_without_it(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sublim.train", "filter=lls_bottom", "audit.enabled=false",
                           "base=tiny_llama", "logger=none", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: audit.enabled=false "), proc.stderr
    assert "filter=lls_bottom" in proc.stderr and not list(tmp_path.glob("outputs/store/*"))


def test_masking_refuses_positions_counted_on_tokens_the_student_does_not_read(load_tiny) -> None:
    """The audit's positions count the teacher's emitted ids; a re-tokenisation that differs would shift them."""
    from sublim import SublimError
    from sublim.student import mask_positions

    _, _, tokenizer = load_tiny("tiny_llama")
    example = tokenize_example(tokenizer, "Continue: 1, 2.", "3, 4", 500)
    answer = [t for t in example["labels"] if t != IGNORE]
    row = {"completion": "3, 4", "mask_positions": [1], "answer_ids": answer[:-1]}
    assert mask_positions(example, row) == [1]
    with pytest.raises(SublimError, match="differs from the tokens the teacher emitted"):
        mask_positions(example, {**row, "answer_ids": [answer[1], answer[0], *answer[2:]]})
    assert mask_positions(example, {"completion": "3, 4"}) == []
