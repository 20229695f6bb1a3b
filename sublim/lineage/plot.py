"""The lineage DAG as a PNG: graphviz ``dot`` when it is installed (it lays out large DAGs well), else a
matplotlib drawing with one row per depth, so a picture never needs more than sublim's own dependencies."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

from sublim.lineage import Lineage, Node

WRAP = 34  # characters per line of a node's facts in the picture


def draw(lineage: Lineage, path: Path) -> None:
    """Write the picture to ``path``: arrows run from each artifact to the ones built from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tpng", "-o", str(path)], input=dot_source(lineage), text=True, check=True)
    else:
        _matplotlib(lineage, path)


def _label(node: Node, root: str | None = None) -> str:
    return "\n".join([*([root] if root else []), node.name, *textwrap.wrap(node.facts, WRAP)])


def _roots(lineage: Lineage) -> dict[tuple[str, str], str]:
    return {node.ident: label for label, node in lineage.roots}


def dot_source(lineage: Lineage) -> str:
    roots = _roots(lineage)
    lines = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, fontsize=10, fontname="Helvetica"];']
    for ident, node in lineage.nodes.items():
        label = _label(node, roots.get(ident)).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'  "{"/".join(ident)}" [label="{label}"];')
    for node in lineage.nodes.values():
        for slot, up in node.upstream.items():
            lines.append(f'  "{"/".join(up.ident)}" -> "{"/".join(node.ident)}" [label="{slot}", fontsize=8];')
    return "\n".join([*lines, "}"]) + "\n"


def layers(lineage: Lineage) -> list[list[Node]]:
    """Nodes by their longest distance from a root, so every arrow points up the page."""
    level: dict[tuple[str, str], int] = {}

    def visit(node: Node, depth: int) -> None:
        if level.get(node.ident, -1) < depth:
            level[node.ident] = depth
            for child in node.upstream.values():
                visit(child, depth + 1)

    for _, root in lineage.roots:
        visit(root, 0)
    rows: list[list[Node]] = [[] for _ in range(max(level.values()) + 1)]
    for ident, depth in level.items():
        rows[depth].append(lineage.nodes[ident])
    return rows


def _matplotlib(lineage: Lineage, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, roots = layers(lineage), _roots(lineage)
    width = max(len(row) for row in rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 3.2 * width), 1.8 * len(rows)))
    at = {node.ident: ((i + 0.5) / len(row), 1 - (depth + 0.5) / len(rows))
          for depth, row in enumerate(rows) for i, node in enumerate(row)}
    for node in lineage.nodes.values():
        for up in node.upstream.values():
            ax.annotate("", xy=at[node.ident], xytext=at[up.ident],
                        arrowprops={"arrowstyle": "->", "color": "0.6", "shrinkA": 18, "shrinkB": 18})
    for ident, (x, y) in at.items():
        ax.text(x, y, _label(lineage.nodes[ident], roots.get(ident)), ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "facecolor": "#e8f0fa" if ident in roots else "white", "edgecolor": "0.4"})
    ax.set_axis_off()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
