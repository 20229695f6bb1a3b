"""``python -m sublim.lineage``: the ancestry of a job's students or of one artifact, as a tree or a picture,
and where two lineages diverge. Bad input is one ``error: ...`` line and exit 2, as for ``sublim.train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from sublim import SublimError, quiet_on_closed_pipe
from sublim.lineage import Lineage, diff, from_ref, from_results, render
from sublim.store import Store, default_root

RESULTS = "results.json"


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit 2, not a usage dump (``--help`` still prints it)."""

    def error(self, message: str) -> NoReturn:
        fail(SublimError(message))


def fail(err: SublimError) -> NoReturn:
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parser() -> _Parser:
    cmd = _Parser(prog="python -m sublim.lineage",
                  description="The ancestry of store artifacts down to the base model file's hash.")
    cmd.add_argument("target", nargs="?", metavar="JOB_DIR | results.json | STAGE/KEY",
                     help="a job's students and evaluations, or one artifact (a unique key prefix is enough)")
    cmd.add_argument("--store", type=Path, default=None,
                     help="the store (default: the job's paths.store, or $SUBLIM_ROOT/outputs/store)")
    cmd.add_argument("--png", type=Path, default=None, metavar="PATH", help="also draw the lineage DAG")
    cmd.add_argument("--diff", nargs=2, metavar=("A", "B"), help="where two artifacts' lineages diverge")
    return cmd


def load(target: str, store_dir: Path | None) -> Lineage:
    """A job dir or results.json by path; anything else that is not a path is STAGE/KEY."""
    path = Path(target)
    if path.is_dir():
        path = path / RESULTS
        if not path.is_file():
            raise SublimError(f"{target} is not a sublim job dir (it has no {RESULTS})")
    if path.is_file():
        return from_results(path, store_dir)
    if path.is_absolute() or target.startswith(".") or target.count("/") != 1:
        raise SublimError(f"{target}: no such job dir or results.json")
    return from_ref(target, _store(store_dir))


def _store(store_dir: Path | None) -> Store:
    root = store_dir or default_root()
    if not root.is_dir():
        raise SublimError(f"no artifact store at {root} (pass --store DIR or set SUBLIM_ROOT)")
    return Store(root)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with quiet_on_closed_pipe():
            if args.diff:
                if args.target or args.png:
                    raise SublimError("--diff A B takes no other target and no --png")
                store = _store(args.store)
                a, b = (from_ref(ref, store) for ref in args.diff)
                print("\n".join(diff(a.roots[0][1], b.roots[0][1])))
                return 0
            if not args.target:
                raise SublimError("name a job dir, a results.json or STAGE/KEY (or --diff A B)")
            lineage = load(args.target, args.store)
            print("\n".join(render(lineage)))
            if args.png:
                from sublim.lineage.plot import draw

                draw(lineage, args.png)
                print(f"picture: {args.png}")
    except SublimError as err:
        fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
