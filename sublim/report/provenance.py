"""Whether the jobs a report pools were computed alike: the check behind pooling seeds run in different sittings.

A study too long for one sitting runs its seeds in several, each into its own sweep dir under one parent, and the
report over the parent pools them. That is only sound if every seed ran the same stage code, and if an artifact
that several jobs name (a seed's control student, shared by its traits; the base model) is the same files in
each of them: a key recomputed on another machine can differ in its last bits. Each job's provenance.json
(sublim/store/provenance.py) records both; this module compares them and says which jobs it could not check.
"""

from __future__ import annotations

from sublim.report.matrix import setting_title


def _code(record: dict) -> str:
    code = record.get("code") or {}
    return f"v{code.get('version', '?')}:{code.get('hash', '?')}"


def _short(values: set) -> str:
    return ", ".join(sorted(str(v)[:12] for v in values if v)) or "unknown"


def problems(rows: list[dict]) -> list[str]:
    """One line per stage whose code differs between the jobs of a setting, and per artifact whose files differ
    between the jobs that name it."""
    out = []
    by_setting: dict[tuple, dict[str, dict[str, list[str]]]] = {}  # setting -> stage -> code -> jobs
    contents: dict[str, dict[str, list[str]]] = {}  # artifact -> content -> jobs
    for row in rows:
        for record in (row["_provenance"] or {}).values():
            stage = record["artifact"].split("/")[0]
            by_setting.setdefault(row["_setting"], {}).setdefault(stage, {}).setdefault(_code(record), []).append(
                row["job"])
            if record.get("content"):
                contents.setdefault(record["artifact"], {}).setdefault(record["content"], []).append(row["job"])
    for setting, stages in by_setting.items():
        for stage, codes in stages.items():
            if len(codes) > 1:
                seen = "; ".join(f"{code} in {', '.join(sorted(set(jobs)))}" for code, jobs in codes.items())
                out.append(f"stage `{stage}` ran different code in the jobs of {setting_title(setting)}: {seen}")
    for artifact, variants in contents.items():
        if len(variants) > 1:
            seen = "; ".join(f"{content} in {', '.join(sorted(set(jobs)))}" for content, jobs in variants.items())
            out.append(f"artifact `{artifact}` has different files in different jobs (recomputed elsewhere?): {seen}")
    return out


def provenance_markdown(rows: list[dict], found: list[str]) -> str:
    """The report's provenance section: what computed the rows, and ``found`` (their ``problems``) or that there are
    none."""
    records = [record for row in rows for record in (row["_provenance"] or {}).values()]
    unchecked = sorted({row["job"] for row in rows if row["_provenance"] is None})
    env = [record.get("env") or {} for record in records]
    commits = {e.get("git_commit") for e in env if e.get("git_commit")}
    lines = ["## Provenance", ""]
    created = sorted(str(r.get("created")) for r in records)
    if records:
        lines.append(f"{len(rows) - len(unchecked)} of {len(rows)} job seeds recorded how their artifacts were "
                     f"made (provenance.json): computed on {_short({r.get('host') for r in records})}, between "
                     f"{created[0]} and {created[-1]}, "
                     f"from sublim commit(s) {_short(commits)}"
                     + (" (some with uncommitted changes)" if any(e.get("git_dirty") for e in env) else "")
                     + f"; torch {_short({e.get('torch') for e in env})}, transformers "
                     f"{_short({e.get('transformers') for e in env})}.")
    if found:
        lines += ["", "**Not computed alike: pooling these jobs mixes versions.**", "", *(f"- {p}" for p in found)]
    elif records:
        lines += ["", "Every stage ran the same code in every job of a setting, and every artifact that several jobs "
                  "share is the same files in each."]
    if unchecked:
        lines += ["", f"Not checked (no provenance.json, older jobs): {', '.join(unchecked)}."]
    return "\n".join(lines)
