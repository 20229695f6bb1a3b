"""Experiment tracking: one W&B run per job (offline unless WANDB_MODE says otherwise), never a login
prompt; local results.json / results.csv are written by the pipeline whatever the logger is."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

if TYPE_CHECKING:
    from sublim.store import Store

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """W&B mode, falling back to offline rather than prompting for a login."""
    if mode == "online" and not _has_wandb_credentials():
        log.warning("WANDB_MODE=online but no W&B credentials (WANDB_API_KEY or `wandb login`): "
                    "logging offline instead; `wandb sync` uploads it later")
        return "offline"
    return mode


class Tracker:
    """Wraps the job's W&B run (or nothing, with logger=none)."""

    def __init__(self, cfg: DictConfig, job_dir: Path, name: str, group: str) -> None:
        self.run: Any = None
        settings = cfg.logger
        if settings.name != "wandb":
            return
        import wandb

        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group or group, name=name,
            tags=list(settings.tags), config=OmegaConf.to_container(cfg, resolve=True), dir=str(job_dir),
            mode=resolve_mode(settings.mode), reinit="create_new", settings=wandb.Settings(console="off", silent=True),
        )
        self.n_table_rows = settings.n_table_rows

    def lightning_loggers(self, prefix: str) -> list[Logger]:
        """Loggers that send a Lightning loop's metrics into this job's run, under ``prefix``."""
        if self.run is None:
            return []
        from pytorch_lightning.loggers import WandbLogger

        return [WandbLogger(experiment=self.run, prefix=prefix)]

    def log(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def table(self, name: str, rows: list[dict]) -> None:
        """A W&B table of the first rows (sample teacher outputs, student answers)."""
        if self.run is None or not rows:
            return
        import wandb

        rows = rows[: self.n_table_rows]
        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def image(self, name: str, path: Path) -> None:
        """A chart the job wrote (PNG), in the run's media."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def artifacts(self, store: Store, stages: Iterable[tuple[str, str]]) -> None:
        """The job's store artifacts (``(stage, key)`` pairs) and everything upstream of them as W&B artifacts, so
        a run names exactly what it read and wrote. Logged by reference to the store path, nothing uploaded or
        hashed (the key already names the content). wandb 0.31 cannot record ``use_artifact`` offline, and one run
        can only link its inputs to its outputs, so each artifact's upstream is named in its metadata."""
        if self.run is None:
            return
        import wandb

        lineages: dict[str, dict] = {}

        def visit(lineage: dict) -> None:
            if (name := artifact_name(lineage)) not in lineages:
                lineages[name] = lineage
                for upstream in lineage.get("upstream", {}).values():
                    visit(upstream)

        for stage, key in stages:
            if store.path(stage, key).is_dir():  # a result name that is not a stage ("teacher_model") is upstream
                visit(store.lineage(stage, key))
        for name, lineage in lineages.items():
            artifact = wandb.Artifact(name, type=lineage["stage"], metadata={
                "key": lineage["key"], "config": lineage["config"], "code": lineage["code"],
                "upstream": {slot: artifact_name(up) for slot, up in lineage.get("upstream", {}).items()}})
            artifact.add_reference(f"file://{store.path(lineage['stage'], lineage['key'])}", checksum=False)
            self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def artifact_name(lineage: dict) -> str:
    """A store artifact's W&B name: its stage and key prefix."""
    return f"{lineage['stage']}-{lineage['key'][:12]}"
