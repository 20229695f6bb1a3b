"""Config-group choices on the command line, checked before Hydra composes anything.

Hydra answers ``base=nope`` with a multi-line message and exit code 1 from inside its own error handler, where
sublim's one-line / exit-2 handling never runs. So the entry point checks every ``group=choice`` override (and
each choice of a sweep, ``trait=owl,nope``) against the files in ``conf/<group>/`` (``sweeps/`` for the
sweep files) first.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


def _choices(override) -> list[str]:
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


def group_problems(args: list[str], roots: list[Path]) -> list[str]:
    """One line per ``group=choice`` whose ``<root>/<group>/<choice>.yaml`` does not exist (with close matches);
    the last root is the repository's, which the lines name paths from."""
    candidates = [arg for arg in args if "=" in arg and not arg.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return []  # malformed: Hydra's own grammar error says where
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
