"""The Hydra entry point: ``python -m sublim.train [-m] [overrides]``.

Composes the config, runs the pipeline through the artifact store, prints the results table and
always closes the W&B run. The config is validated first (sublim/schema.py; a multirun validates every job
before the first starts). Input errors print one ``error: ...`` line each with the fix (no stack trace) and
exit 2; finished stages stay in the store, so the same command resumes after the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sublim import SublimError
from sublim.schema import ConfigError, validate
from sublim.schema.overrides import check_overrides

log = logging.getLogger("sublim")
CONF = Path(__file__).resolve().parents[1] / "conf"

# task name -> module with run(cfg, job_dir, tracker) -> results and format_table(results) -> str
TASKS = {"subliminal": "sublim.pipeline", "mnist_aux": "sublim.toy.mnist_aux"}


def _quiet_libraries() -> None:
    """Keep the console to progress bars and sublim's own lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
                 "lightning_fabric.utilities.seed", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def job_identity() -> tuple[Path, str, str]:
    """Job dir, W&B run name (the job's overrides) and group (the sweep, or "runs")."""
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or "default"
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    group = Path(hydra_cfg.sweep.dir).name if multirun else "runs"
    return Path(hydra_cfg.runtime.output_dir), name, group


def bars_on_stderr() -> contextlib.AbstractContextManager:
    """While a job computes, whatever draws on stdout (Lightning's Rich progress bars do) goes to stderr with the
    log lines: stdout carries only the job's table, so it can be piped or parsed."""
    return contextlib.redirect_stdout(sys.stderr)


def run_job(cfg: DictConfig, job_dir: Path, name: str = "default", group: str = "runs") -> dict:
    """Run one job; W&B is closed whatever happens. The config is validated first (raises ConfigError)."""
    from sublim.tracking import Tracker

    validate(cfg)
    if cfg.task not in TASKS:
        raise SublimError(f"task={cfg.task} is not one of: {', '.join(TASKS)}")
    task = importlib.import_module(TASKS[cfg.task])
    _quiet_libraries()
    tracker = Tracker(cfg, job_dir, name, group)
    try:
        with bars_on_stderr():
            results = task.run(cfg, job_dir, tracker)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    print("\n" + task.format_table(results) + f"\n\nresults: {job_dir / 'results.json'}", flush=True)
    return results


def _log_to_files(level: int, message: str) -> None:
    """A record for the log files only (Hydra's job log), not the console, which gets the message as one line."""
    record = log.makeRecord(log.name, level, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(err: SublimError) -> NoReturn:
    """A user or environment error: its line(s) on stderr, no stack trace, exit code 2."""
    _log_to_files(logging.ERROR, str(err))  # the job's log file keeps why it stopped; the console has it once
    lines = err.lines if isinstance(err, ConfigError) else [str(err)]
    print("\n".join(f"error: {line}" for line in lines), file=sys.stderr, flush=True)
    raise SystemExit(2)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job_dir, name, group = job_identity()
    try:
        validate(cfg)  # before anything is computed, dry runs included
        if cfg.dry_run:
            print(f"# job {name}\n{OmegaConf.to_yaml(cfg, resolve=True)}", flush=True)
            return
        run_job(cfg, job_dir, name, group)
    except SublimError as err:
        fail(err)


def entry(run: Callable[[], None] = main) -> None:
    """An entry point: the command line's overrides checked against conf/ (one line each, exit 2) before Hydra
    starts ``run``; ``python -m sublim.train`` by default, ``python -m sublim.audit`` with its own main."""
    try:
        check_overrides(CONF)
    except ConfigError as err:
        fail(err)
    run()


if __name__ == "__main__":
    entry()
