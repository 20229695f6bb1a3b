"""Scale-out: DDP student training over spawned workers, and sweeps over submitit's local launcher.

DDP here is 2 CPU processes over gloo. ``student.strategy=ddp`` is run by the training stage spawning its own
workers (Lightning's own ``ddp`` would re-run the command line, i.e. the Hydra job or sweep, per device).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublim import SublimError
from sublim.report import collect
from sublim.store import Store
from sublim.student import StudentModule, add_lora, collate, tokenize_example, train_lora
from sublim.training import ADAPTER_DIR, GlobalBatchSampler, fit, trainer_strategy
from tests.conftest import CONF, TINY, compose_config

ROOT = CONF.parent

# Answers of 3 to 6 numbers: workers' batches hold different numbers of answer tokens, so a plain average of the
# workers' mean losses (DDP's default) would differ from the single device's token mean.
ROWS = [{"prompt": f"Continue: {a}, {a + 1}, {a + 2}." + " Go on." * (a % 3),
         "completion": ", ".join(str(a + 3 + i) for i in range(3 + a % 4))} for a in range(100, 137)]


@pytest.mark.parametrize(("n", "batch_size", "world"), [(32, 4, 2), (37, 4, 2), (37, 3, 3), (5, 4, 2), (3, 2, 4)])
def test_workers_split_the_single_device_batches(n: int, batch_size: int, world: int) -> None:
    """Step k's batches of the workers together are step k's batch of one device with batch_size x world."""
    for epoch in (0, 1):
        single = GlobalBatchSampler(n, batch_size * world, seed=3)
        workers = [GlobalBatchSampler(n, batch_size, seed=3, rank=r, world=world) for r in range(world)]
        for sampler in (single, *workers):
            sampler.set_epoch(epoch)
        steps = [sampler.batches() for sampler in workers]
        assert all(len(batches) == len(single.batches()) for batches in steps), "every worker takes every step"
        for r, sampler in enumerate(workers):
            assert len(sampler) == len(list(sampler)) == sum(len(b) for b in steps[r])
            assert all(len(b) <= batch_size for b in steps[r])
        for k, batch in enumerate(single.batches()):
            split = [i for r in range(world) for i in steps[r][k]]
            assert set(split) == set(batch), (epoch, k)
            assert len(split) == len(batch) or len(batch) < world, "examples repeat only to fill idle workers"
    assert sorted(i for b in single.batches() for i in b) == list(range(n))
    first, second = GlobalBatchSampler(n, batch_size, seed=3), GlobalBatchSampler(n, batch_size, seed=3)
    second.set_epoch(1)
    assert n < 4 or first.batches() != second.batches(), "each epoch has its own order"
    assert GlobalBatchSampler(n, batch_size, seed=4).batches() != first.batches() or n < 4


def test_strategies_that_rerun_the_command_line_are_refused() -> None:
    student = compose_config(["base=tiny_llama"]).student
    assert trainer_strategy(student) == ("auto", 1)
    student.strategy, student.devices = "ddp", 1
    assert trainer_strategy(student) == ("auto", 1)
    if not torch.cuda.is_available():
        student.devices = "auto"
        assert trainer_strategy(student) == ("auto", 1), "one CPU process: nothing to spawn"
    student.strategy = "fsdp"
    assert trainer_strategy(student) == ("fsdp", 1)
    student.devices = 2
    with pytest.raises(SublimError, match="re-running the command line.*student.strategy=ddp"):
        trainer_strategy(student)


def _train(load_tiny, out: Path, *overrides: str) -> tuple[dict, list[float], dict, dict]:
    cfg, net, tokenizer = load_tiny("tiny_llama", "student.epochs=2", "student.lr=2e-2", "student.warmup_steps=2",
                                    *overrides)
    metrics = train_lora(net, tokenizer, ROWS, cfg.student, seed=0, out=out)
    lines = [line.split(",") for line in (out / "log" / "metrics.csv").read_text().splitlines()]
    column = lines[0].index("train/loss")
    losses = [float(cols[column]) for cols in lines[1:] if cols[column]]
    in_memory = {f"base_model.model.{name.replace('.default', '')}": p.detach().clone()
                 for name, p in net.named_parameters() if "lora_" in name}
    return metrics, losses, load_file(out / ADAPTER_DIR / "adapter_model.safetensors"), in_memory


def test_ddp_on_two_processes_trains_what_one_device_does(load_tiny, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """devices=2 x batch_size=4 vs devices=1 x batch_size=8: the same examples each step, the same token-mean
    loss, so the same losses and adapter up to float rounding (the gradients' all-reduce sums in another order).
    37 examples: the last global batch (5) is split 3 + 2."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers inherit it
    single, single_losses, single_adapter, _ = _train(load_tiny, tmp_path / "single", "student.batch_size=8")
    ddp, ddp_losses, ddp_adapter, ddp_memory = _train(load_tiny, tmp_path / "ddp", "student.batch_size=4",
                                                      "student.strategy=ddp", "student.devices=2")
    halved, halved_losses, halved_adapter, _ = _train(load_tiny, tmp_path / "halved", "student.batch_size=4")

    assert ddp["devices"] == 2 and single["devices"] == 1
    for key in ("n_examples", "steps", "tokens"):  # tokens and steps are counted over both workers
        assert ddp[key] == single[key], key
    assert single["steps"] == 10
    assert len(ddp_losses) == len(single_losses) == 10  # rank 0's CSV holds the global loss of every step
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-5)
    assert ddp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert ddp["initial_loss"] == pytest.approx(single["initial_loss"], rel=1e-5)
    assert ddp["initial_loss"] == pytest.approx(single_losses[0], rel=1e-5)
    assert ddp_adapter.keys() == single_adapter.keys()
    deviation = max(float((ddp_adapter[k] - single_adapter[k]).abs().max()) for k in single_adapter)
    scale = max(float(v.abs().max()) for v in single_adapter.values())
    assert deviation < 1e-4, deviation
    # The check discriminates: one device at half the batch trains a visibly different adapter
    halved_deviation = max(float((halved_adapter[k] - single_adapter[k]).abs().max()) for k in single_adapter)
    assert halved_deviation > 100 * max(deviation, 1e-6) and halved_deviation > 0.01 * scale, halved_deviation
    assert halved["steps"] == 20 and halved_losses != pytest.approx(single_losses, abs=1e-3)
    # The main process holds the trained weights too (Lightning loads rank 0's back), as after one device
    assert ddp_memory.keys() == ddp_adapter.keys()
    for key, value in ddp_memory.items():
        torch.testing.assert_close(value, ddp_adapter[key])


def test_a_workers_loss_guard_stops_the_main_process_with_its_message(load_tiny, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, net, tokenizer = load_tiny("tiny_llama", "student.lr=1e30", "student.warmup_steps=0", "student.batch_size=4",
                                    "student.strategy=ddp", "student.devices=2")
    with pytest.raises(SublimError, match=r"^student loss became nan at step \d+: lower student.lr"):
        train_lora(net, tokenizer, ROWS, cfg.student, seed=0, out=tmp_path)
    assert not (tmp_path / ADAPTER_DIR).exists()


class _AbortOnce(StudentModule):
    """Rank 1 aborts at its first step unless ``marker`` exists (creating it first): a worker killed by a signal."""

    def __init__(self, net: torch.nn.Module, marker: Path) -> None:
        super().__init__(net, lr=2e-2, warmup_steps=2)
        self.marker = marker

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1 and not self.marker.exists():
            self.marker.touch()
            os.abort()
        return super().training_step(batch, batch_idx)


def test_a_worker_killed_by_a_signal_restarts_the_fit_once(load_tiny, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, net, tokenizer = load_tiny("tiny_llama", "student.epochs=1", "student.batch_size=4", "student.strategy=ddp",
                                    "student.devices=2")
    examples = [tokenize_example(tokenizer, r["prompt"], r["completion"], 500) for r in ROWS]
    module = _AbortOnce(add_lora(net.train(), cfg.student), tmp_path / "aborted")
    metrics = fit(module, examples, functools.partial(collate, pad_id=tokenizer.pad_token_id), cfg.student, 0,
                  tmp_path / "out")
    assert (tmp_path / "aborted").exists(), "the first attempt's worker was killed"
    assert metrics["devices"] == 2 and metrics["steps"] == -(-len(ROWS) // 8) and metrics["tokens"] > 0
    assert (tmp_path / "out" / ADAPTER_DIR / "adapter_model.safetensors").exists()


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sublim.train", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_cli_job_with_ddp_matches_the_single_device_job(tmp_path: Path) -> None:
    """``student.strategy=ddp student.devices=2`` from ``python -m sublim.train``: one job (no re-run of the Hydra
    app), both students trained on 2 workers, the same losses as one device with the doubled batch."""
    tiny = [o for o in TINY if not o.startswith("student.batch_size")]
    _cli("base=tiny_llama", *tiny, "student.batch_size=8", f"paths.root={tmp_path / 'single'}")
    _cli("base=tiny_llama", *tiny, "student.batch_size=4", "student.strategy=ddp", "student.devices=2",
         f"paths.root={tmp_path / 'ddp'}")
    runs = {name: list((tmp_path / name).glob("outputs/runs/*/*")) for name in ("single", "ddp")}
    assert [len(r) for r in runs.values()] == [1, 1], runs
    results = {name: json.loads((r[0] / "results.json").read_text()) for name, r in runs.items()}
    for arm in ("control", "treatment"):
        single, ddp = results["single"]["arms"][arm]["train"], results["ddp"]["arms"][arm]["train"]
        assert (single["devices"], ddp["devices"]) == (1, 2)
        assert ddp["tokens"] == single["tokens"] and ddp["steps"] == single["steps"]
        assert ddp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)


@pytest.mark.slow
def test_submitit_local_sweep_reports_both_jobs_and_computes_each_stage_once(tmp_path: Path) -> None:
    """Two jobs in two submitit processes at once on one store: every shared stage (model, prompts, the control
    arm's sample/filter/train, the base's answers) computed by one and reused by the other."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    _cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         "trait=owl,eagle", "base=tiny_llama", *TINY, f"paths.root={tmp_path}")
    sweeps = list(tmp_path.glob("outputs/multiruns/*/*"))
    assert len(sweeps) == 1, sweeps
    assert sorted(row["trait"] for row in collect(sweeps[0])) == ["eagle", "owl"]
    report = (sweeps[0] / "report.md").read_text()
    assert "| owl |" in report and "| eagle |" in report
    assert (sweeps[0] / "report.csv").exists()

    events = Store(tmp_path / "outputs" / "store").events()
    assert len({e["pid"] for e in events}) == 2, "the two jobs ran in two processes"
    computed = Counter((e["stage"], e["key"]) for e in events if e["event"] == "computed")
    assert computed and max(computed.values()) == 1, [k for k, n in computed.items() if n > 1]
    shared = {(e["stage"], e["key"]) for e in events if e["event"] == "reused"} & set(computed)
    assert {"model", "prompts", "sample", "filter", "train", "answers"} <= {stage for stage, _ in shared}, shared
    jobs = [json.loads(p.read_text()) for p in sweeps[0].glob("*/results.json")]
    assert len(jobs) == 2
    if all("stages" in job for job in jobs):
        assert len({job["stages"]["train/control"]["key"] for job in jobs}) == 1, "one control student"
