"""Command-line overrides, checked before Hydra composes anything.

Hydra answers ``base=nope``, ``studnt.r=3`` or ``student.r=[`` with a multi-line message and exit code 1 from
inside its own error handler, where sublim's one-line / exit-2 handling never runs. So each entry point checks
first: the grammar of every override, every ``group=choice`` (and each choice of a sweep, ``trait=owl,nope``)
against the files in ``conf/<group>/`` (``sweeps/`` for the sweep files), and every ``key=value`` against the
keys of the config those choices compose. Added keys (``+key=value``) are the schema's to check (sublim.schema).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import OmegaConf

from sublim.schema.fields import ConfigError

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _choices(override: Override) -> list[str]:
    if override.is_sweep_override():
        return [str(choice) for choice in override.sweep_string_iterator()]
    value = override.value()
    return [] if value is None else [str(value)]


def _options(group: str, roots: list[Path]) -> tuple[Path, list[str]] | None:
    """The group's dir on sublim's search path (conf/, then the repository root for sweeps/) and its choices."""
    for root in roots:
        if (root / group).is_dir() and (known := sorted(p.stem for p in (root / group).glob("*.yaml")
                                                        if not p.stem.startswith("_"))):
            return root / group, known
    return None


def _parse(args: list[str]) -> tuple[list[Override], list[str]]:
    """The overrides among the arguments, and one line for each that Hydra's grammar cannot read."""
    overrides, problems = [], []
    parser = OverridesParser.create()
    for arg in (arg for arg in args if "=" in arg and not arg.startswith("-")):
        try:
            overrides += parser.parse_overrides([arg])
        except HydraException as err:
            problems.append(f"{arg} is not a valid override ({str(err).splitlines()[0]}); the grammar: {GRAMMAR}")
    return overrides, problems


def _group_problems(overrides: list[Override], roots: list[Path]) -> list[str]:
    """One line per choice whose ``<root>/<group>/<choice>.yaml`` does not exist (with close matches); the last
    root is the repository's, which the lines name paths from."""
    problems = []
    for override in overrides:
        group = override.key_or_group
        found = None if override.is_delete() or group.startswith("hydra") else _options(group, roots)
        if found is None:
            continue
        where, known = found
        for choice in _choices(override):
            if not (where / f"{choice}.yaml").exists():
                close = difflib.get_close_matches(choice, known, n=3)
                key = override.get_key_element()
                hint = f"did you mean {' or '.join(f'{key}={c}' for c in close)}? " if close else ""
                problems.append(f"{key}={choice} is not a {group} config ({where.relative_to(roots[-1])}/); "
                                f"{hint}known: {', '.join(known)}")
    return problems


def _unknown_key(line: str, key: str, config: dict) -> str | None:
    """``None`` if ``key`` (dotted) names an entry of ``config``, else the line saying where it stops matching."""
    node: Any = config
    for depth, part in enumerate(parts := key.split(".")):
        where = ".".join(parts[:depth])
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict):
            known = sorted(node)
            close = [".".join([*parts[:depth], match]) for match in difflib.get_close_matches(part, known, n=3)]
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            return f"{line} is not a known key; {hint}known{f' under {where}' if where else ''}: {', '.join(known)}"
        else:
            return f"{line} is not a known key: {where} is a single value, not a group of keys"
    return None


def _key_problems(overrides: list[Override], roots: list[Path]) -> list[str]:
    """Each ``key=value`` whose key the composed config lacks (Hydra's "Could not override ... not in struct")."""
    def is_key(override: Override) -> bool:
        return (override.type == OverrideType.CHANGE and override.package is None
                and not override.key_or_group.startswith("hydra") and _options(override.key_or_group, roots) is None)

    keys = [override for override in overrides if is_key(override)]
    if not keys:
        return []
    composing = [f"{o.get_key_element()}={_choices(o)[0]}" if o.is_sweep_override() else o.input_line
                 for o in overrides if not is_key(o)]
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(roots[0]), version_base="1.3"):
            config = OmegaConf.to_container(compose("config", overrides=composing), resolve=False)
    except Exception:  # noqa: BLE001 - whatever else is wrong, Hydra's own message says it when it composes
        return []
    return [line for override in keys if (line := _unknown_key(override.input_line, override.key_or_group, config))]


def override_problems(args: list[str], roots: list[Path]) -> list[str]:
    """One line per bad override: unreadable, an unknown group choice, or an unknown key (in that order: each
    check needs the one before it to pass)."""
    overrides, problems = _parse(args)
    return problems or _group_problems(overrides, roots) or _key_problems(overrides, roots)


def check_overrides(conf: Path) -> None:
    """Raise ConfigError (one line per bad override on the command line) so it is refused before Hydra starts."""
    if problems := override_problems(sys.argv[1:], [conf, conf.parent]):
        raise ConfigError(problems)
