"""Typed schemas of every config group, checked on the composed, resolved config before any stage runs.

Why: a typo (``+student.epochz=3``) or an impossible value (``student.lr=1e9``, ``data.n_train=0``) used to
surface minutes into a job, after sampling, or never. ``validate(cfg)`` refuses it up front with one line per
problem, ``<field>=<value> <what is wrong>; <the fix>``, and ``ValidateCallback`` (conf/hydra/default.yaml) does
the same for every job of a multirun before the first one starts. Every group takes its known keys only.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import ValidationError

from sublim.schema.fields import ConfigError, _suggest
from sublim.schema.groups import TASKS

__all__ = ["ConfigError", "ValidateCallback", "sweep_problems", "validate"]


# --- checking and messages ---------------------------------------------------------------------------------

_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "list": "a list",
          "dict": "a mapping", "model": "a mapping"}


def _show(value: Any) -> str:
    """A value as the command line writes it, on one short line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    text = " ".join(text.split()) or '""'
    return text if len(text) <= 60 else text[:57] + "..."


def _line(field: str, value: Any, what: str, fix: str, parent: str = "") -> str:
    fix = fix.replace("{field}", field).replace("{parent}", f"{parent}." if parent else "")
    return f"{field}={_show(value)} {what}; {fix}"


def _error_lines(err: ValidationError) -> list[str]:
    """One line per pydantic error, located by the config key (union tags dropped) and worded for the CLI."""
    lines: list[str] = []
    for error in err.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and "=" in p))
        kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
        if kind == "sublim":
            for name, val, what, fix in ctx["problems"]:
                lines.append(_line(".".join(p for p in (where, name) if p), val, what, fix, where))
        elif kind == "sublim_kind":
            field, kinds = ".".join(p for p in (where, ctx["field"]) if p), ctx["kinds"].split(", ")
            value = value.get(ctx["field"]) if isinstance(value, dict) else value
            lines.append(_line(field, value, f"is not one of: {ctx['kinds']}", _suggest(value, kinds, field)))
        elif kind == "literal_error":
            choices = list(dict.fromkeys(c.strip("'") for c in re.split(r", | or ", ctx["expected"])))
            lines.append(_line(where, value, f"is not one of: {', '.join(choices)}", _suggest(value, choices, where)))
        elif kind == "missing":
            lines.append(_line(where, "???", "is missing", "add it back: +{field}=<value> (see conf/)"))
        elif kind in ("too_short", "string_too_short"):
            lines.append(_line(where, value, "must not be empty", "give {field} a value"))
        elif (simple := kind.split("_")[0]) in _TYPES and kind.endswith(("_type", "_parsing", "_from_float")):
            lines.append(_line(where, value, f"is not {_TYPES[simple]}", f"give {{field}} {_TYPES[simple]}"))
        else:
            lines.append(_line(where, value, error["msg"][0].lower() + error["msg"][1:], "fix {field}"))
    return lines


def _resolve(cfg: DictConfig | dict) -> dict:
    """The resolved config without Hydra's own node; a ??? or a broken interpolation becomes a ConfigError."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        if isinstance(err, MissingMandatoryValue):
            raise ConfigError([f"{key}=??? is not set; set {key}=<value>"]) from None
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in re.findall(r"[^.\[\]]+", key):  # down to the interpolation's own text
            raw = raw[int(part)] if isinstance(raw, list) else raw.get(part) if isinstance(raw, dict) else None
        reason = str(err).splitlines()[0]
        raise ConfigError([f"{key}={_show(raw)} does not resolve ({reason}); fix the interpolation or "
                           f"override {key}"]) from None


def validate(cfg: DictConfig | dict) -> None:
    """Check a composed config against its task's schema; raises ConfigError listing every problem found."""
    data = _resolve(cfg)
    schema = TASKS.get(data.get("task"))
    if schema is None:
        raise ConfigError([_line("task", data.get("task"), f"is not one of: {', '.join(TASKS)}",
                                 _suggest(data.get("task"), list(TASKS), "task"))])
    try:
        schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_error_lines(err)) from None


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_problems(config: DictConfig) -> list[str]:
    """Compose and validate every job of a BasicSweeper multirun as the sweeper will: ``error:`` lines, each
    prefixed by the swept overrides of the first job it occurs in (a problem of many jobs is listed once)."""
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return []  # other sweepers pick jobs as they go: main() validates each job before it runs
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(OmegaConf.to_container(config.hydra.overrides.task))
    jobs = BasicSweeper.split_arguments(OverridesParser.create(config_loader=loader).parse_overrides(arguments),
                                        None)[0]
    varying = {o for job in jobs for o in job if sum(o in other for other in jobs) < len(jobs)}
    found: dict[str, list[list[str]]] = {}
    for job in jobs:
        try:
            job_config = loader.load_sweep_config(config, list(job))
        except Exception:  # noqa: BLE001 (a composition error: the sweeper reports it itself, before any job)
            continue
        try:
            validate(job_config)
        except ConfigError as err:
            for line in err.lines:
                found.setdefault(line, []).append([o for o in job if o in varying])
    lines = []
    for line, where in found.items():
        more = f" and {len(where) - 1} more jobs" if len(where) > 1 else ""
        lines.append(f"error: [{' '.join(where[0])}{more}] {line}" if where[0] else f"error: {line}")
    return lines


class ValidateCallback(Callback):
    """Refuses a multirun with any bad job before the first job starts (exit 2, one line per problem)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if lines := sweep_problems(config):
            print("\n".join(lines), file=sys.stderr, flush=True)
            raise SystemExit(2)  # a BaseException: Hydra turns a callback's Exception into a mere warning
