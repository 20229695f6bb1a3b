"""The ancestry of store artifacts as a DAG: what ``python -m sublim.lineage`` prints, diffs and draws.

Every ``lineage.json`` already nests the full lineage of its upstream artifacts, so one file per root holds the
whole tree; the store is read only for the figures a researcher wants next to a node (an audit's summary, a
student's final loss). A shared ancestor (the model, the prompts) is one ``Node``: the text tree prints it once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sublim import SublimError
from sublim.store import LINEAGE, Store
from sublim.store.cli import _artifacts

ROOT_STAGES = ("train", "distill", "audit", "evaluate")  # a job's students and evaluations, printed in this order
WEIGHT_FILES = (".safetensors", ".bin", ".gguf")
SHORT = 48  # characters of a system prompt shown in a node's line


@dataclass
class Node:
    """One store artifact; ``upstream`` maps its input slots to their (shared) nodes."""

    stage: str
    key: str
    lineage: dict
    facts: str = ""
    upstream: dict[str, Node] = field(default_factory=dict)

    @property
    def ident(self) -> tuple[str, str]:
        return self.stage, self.key

    @property
    def name(self) -> str:
        return f"{self.stage} {self.key[:12]}"


@dataclass
class Lineage:
    """Named roots (``train/treatment``...; unnamed for one artifact) and every node below them, once each."""

    roots: list[tuple[str, Node]]
    nodes: dict[tuple[str, str], Node] = field(default_factory=dict)


def build(lineage: dict, store: Store, nodes: dict[tuple[str, str], Node]) -> Node:
    """The node of a lineage dict, reusing one already in ``nodes`` so shared ancestors stay shared."""
    ident = (lineage["stage"], lineage["key"])
    if ident in nodes:
        return nodes[ident]
    node = nodes[ident] = Node(*ident, lineage, facts(lineage, store.path(*ident)))
    node.upstream = {slot: build(up, store, nodes) for slot, up in sorted((lineage.get("upstream") or {}).items())}
    return node


def facts(lineage: dict, path: Path) -> str:
    """The few facts of a node worth a glance, read from its config (any stage) and its result files."""
    reads, params = lineage["config"].get("reads", {}), lineage["config"].get("params", {})
    parts = []
    if lineage["stage"] == "model":
        parts.append(f"{reads.get('name')} {weights(lineage)}")
    if trait := (reads.get("trait") or {}).get("name"):
        parts.append(f"trait {trait}")
    if "system_prompt" in params:
        parts.append(f"system prompt {shorten(params['system_prompt'])}" if params["system_prompt"]
                     else "no system prompt")
    if "role" in params:
        parts.append(f"role {params['role']}")
    if filters := (reads.get("filter") or {}).get("filters"):
        parts.append("filter " + "+".join(f["name"] for f in filters))
    sampling = reads.get("sampling") or {}
    if "temperature" in sampling:
        parts.append(f"T {sampling['temperature']}" + (" constrained" if sampling.get("constrained") else ""))
    if "n_prompts" in (reads.get("data") or {}):
        parts.append(f"n_prompts {reads['data']['n_prompts']}")
    if "n_train" in params:
        parts.append(f"n_train {params['n_train']}")
    if "seed" in reads:
        parts.append(f"seed {reads['seed']}")
    if (summary := _json(path / "summary.json")) and "lls" in summary:
        parts.append(f"LLS {summary['lls']['mean']:.4f}, answer shift {summary['answer_shift']['mean']:.4f}")
    if (metrics := _json(path / "metrics.json")) and "final_loss" in metrics:
        parts.append(f"final loss {metrics['final_loss']:.4f}")
    return ", ".join(parts)


def weights(model: dict) -> str:
    """What pins a model artifact's weights: its source file's sha256, a hub revision, else its weight files'."""
    content = model["config"].get("params", {}).get("content") or {}
    if content.get("sha256"):
        return f"sha256 {content['sha256']}"
    if content.get("revision"):
        return f"hub revision {content['revision']}"
    return ", ".join(f"{name} sha256 {record['sha256']}" for name, record in sorted(model.get("files", {}).items())
                     if name.endswith(WEIGHT_FILES))


def shorten(text: str, width: int = SHORT) -> str:
    return json.dumps(text if len(text) <= width else text[:width - 1] + "…", ensure_ascii=False)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- what to trace --------------------------------------------------------------------------------------

def from_results(path: Path, store_dir: Path | None) -> Lineage:
    """The lineage of a job's students and evaluations (every seed and generation) from its results.json."""
    results = _json(path)
    if not isinstance(results, dict) or not (results.get("stages") or results.get("seeds")):
        raise SublimError(f"{path} is not a sublim results.json (it has no stages)")
    if store_dir is None:
        store_dir = Path(((results.get("config") or {}).get("paths") or {}).get("store", ""))
        if not store_dir.is_dir():
            raise SublimError(f"the store {store_dir} named in {path} does not exist here; pass --store DIR")
    store = Store(store_dir)
    lineage = Lineage([])
    for label, stage, key in _roots(results):
        if not (store.path(stage, key) / LINEAGE).is_file():
            raise SublimError(f"{path} names {stage}/{key}, which is not in the store {store.root}; pass --store DIR")
        lineage.roots.append((label, build(store.lineage(stage, key), store, lineage.nodes)))
    return lineage


def _roots(results: dict) -> Iterator[tuple[str, str, str]]:
    """(label, stage, key) of each root: per seed, per generation, students before the evaluations that use them."""
    seeds = results.get("seeds") or [results]
    for seed in seeds:
        generations = seed.get("generations") or [seed]
        for generation in generations:
            prefix = (f"seed{seed.get('seed')} " if len(seeds) > 1 else "") + \
                     (f"gen{generation['generation']} " if len(generations) > 1 else "")
            named = [(name, name.split("/")[0], record["key"]) for name, record in generation["stages"].items()]
            for root_stage in ROOT_STAGES:
                yield from ((prefix + name, stage, key) for name, stage, key in named if stage == root_stage)


def from_ref(ref: str, store: Store) -> Lineage:
    """The lineage of one artifact named ``stage/key`` (a unique key prefix is enough)."""
    stage, key = resolve(ref, store)
    lineage = Lineage([])
    lineage.roots.append(("", build(store.lineage(stage, key), store, lineage.nodes)))
    return lineage


def resolve(ref: str, store: Store) -> tuple[str, str]:
    """``stage/key-prefix`` to the (stage, key) of the one artifact it names."""
    stage, _, prefix = ref.partition("/")
    if not stage or not prefix or "/" in prefix or stage.startswith("."):
        raise SublimError(f"{ref!r} is not a job dir, a results.json or STAGE/KEY (e.g. train/0123abcd)")
    if not (store.root / stage).is_dir():
        raise SublimError(f"no stage {stage!r} in the store {store.root}")
    keys = [key for _, key in _artifacts(store, stage) if key.startswith(prefix)]
    if not keys:
        raise SublimError(f"no {stage}/{prefix} in the store {store.root}")
    if len(keys) > 1:
        raise SublimError(f"{len(keys)} artifacts match {stage}/{prefix}; give more of the key")
    return stage, keys[0]


# --- text ---------------------------------------------------------------------------------------------

def render(lineage: Lineage) -> list[str]:
    """The DAG as indented trees, one per root; a node already printed is one ``↑ see above`` line."""
    seen: set[tuple[str, str]] = set()
    lines = []
    for label, node in lineage.roots:
        lines += _lines(node, f"{label}: " if label else "", "", "", seen)
    return lines


def _lines(node: Node, label: str, first: str, rest: str, seen: set[tuple[str, str]]) -> list[str]:
    head = f"{first}{label}{node.name}"
    if node.ident in seen:
        return [f"{head}  ↑ see above"]
    seen.add(node.ident)
    lines = [f"{head}  {node.facts}".rstrip()]
    slots = list(node.upstream.items())
    for i, (slot, child) in enumerate(slots):
        last = i == len(slots) - 1
        lines += _lines(child, f"{slot}: ", rest + ("└─ " if last else "├─ "), rest + ("   " if last else "│  "), seen)
    return lines


def depth(node: Node, stage: str) -> int | None:
    """Edges from ``node`` down to the deepest ``stage`` artifact below it (None if there is none)."""
    if node.stage == stage:
        return 0
    below = [d for child in node.upstream.values() if (d := depth(child, stage)) is not None]
    return 1 + max(below) if below else None


# --- diff ---------------------------------------------------------------------------------------------

def diff(a: Node, b: Node) -> list[str]:
    """Two lineages walked together slot by slot down to where they meet: per differing pair the config fields
    that differ (dotted paths), then the artifacts both share."""
    shared: dict[tuple[str, str], Node] = {}
    lines = [f"A = {a.stage}/{a.key}", f"B = {b.stage}/{b.key}"]
    lines += _diff(a, b, "", "", shared)
    lines.append("shared: " + (", ".join(node.name for node in shared.values()) or "nothing"))
    return lines


def _diff(a: Node, b: Node, label: str, indent: str, shared: dict[tuple[str, str], Node]) -> list[str]:
    if a.ident == b.ident:
        shared.update(_below(a))
        return [f"{indent}{label}{a.name}  shared"]
    if a.stage != b.stage:
        return [f"{indent}{label}{a.name} | {b.name}  different stages"]
    changed = [f"{indent}    {path}: {_value(x)} | {_value(y)}" for path, x, y in config_diff(a.lineage, b.lineage)]
    lines = [f"{indent}{label}{a.stage} {a.key[:12]} | {b.key[:12]}"
             + ("" if changed else "  same config, upstream differs"), *changed]
    for slot in sorted(a.upstream.keys() | b.upstream.keys()):
        if slot in a.upstream and slot in b.upstream:
            lines += _diff(a.upstream[slot], b.upstream[slot], f"{slot}: ", indent + "  ", shared)
        else:
            side, node = ("A", a.upstream[slot]) if slot in a.upstream else ("B", b.upstream[slot])
            lines.append(f"{indent}  {slot}: only in {side}: {node.name}")
    return lines


def _below(node: Node) -> dict[tuple[str, str], Node]:
    found = {node.ident: node}
    for child in node.upstream.values():
        found |= _below(child)
    return found


def config_diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(dotted path, A's value, B's value) of every differing field of two artifacts' ``config``."""
    flat_a, flat_b = dict(_flatten(a["config"])), dict(_flatten(b["config"]))
    return [(path, flat_a.get(path), flat_b.get(path)) for path in sorted(flat_a.keys() | flat_b.keys())
            if flat_a.get(path) != flat_b.get(path)]


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict | list) and value:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for name, item in items:
            yield from _flatten(item, f"{prefix}.{name}" if prefix else str(name))
    else:
        yield prefix, value


def _value(value: Any) -> str:
    return shorten(value, 2 * SHORT) if isinstance(value, str) else json.dumps(value)
