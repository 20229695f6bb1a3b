"""A stage is a declaration: its store namespace, the config fields it reads, its upstream, its code, its compute.

Its store key is derived from that declaration and nothing else:

- **reads**: dotted paths into the job's view of the config (``sampling``, ``teacher.precision``,
  ``{role}.dtype`` filled from a parameter). ``compute`` is handed *only* those fields, as a struct
  config that raises on any other access, so a field that is read is a field that is keyed.
- **params**: values the pipeline derives (an arm's system prompt, the training size); keyed too.
- **upstream**: the artifacts it consumes, keyed by their own keys.
- **code**: an explicit ``version`` plus a hash of the source of the stage's module and of every sublim
  module it imports, transitively (docstrings, comments and formatting excluded). A researcher who
  edits a filter or a prompt template and reruns gets the stage recomputed, with no version to bump;
  ``version`` is for changes the source does not show (a dependency's behaviour, a data file).
  Modules that cannot change a result (the store, tracking, config checks) are left out, so editing
  them does not throw away hours of sampling.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sublim import modalities
from sublim.registry import Registry
from sublim.store import Artifact, Store
from sublim.tracking import Tracker

log = logging.getLogger(__name__)

# Modules whose code cannot change what a stage computes: they are not part of any stage's code hash.
INFRASTRUCTURE = frozenset({
    "sublim", "sublim.stage", "sublim.registry", "sublim.tracking", "sublim.train", "sublim.report",
    "sublim.store", "sublim.store.lock", "sublim.store.cli", "sublim.store.__main__",
    "sublim.schema", "sublim.schema.fields", "sublim.schema.groups",
})

STAGES: Registry[Stage] = Registry("stage", "sublim.stages")


@dataclass(frozen=True)
class Inputs:
    """What ``compute`` sees: the declared config fields, parameters and upstream artifacts."""

    cfg: DictConfig
    params: dict[str, Any]
    upstream: dict[str, Artifact | None]
    store: Store
    tracker: Tracker | None
    label: str

    def __getattr__(self, name: str) -> Artifact | None:
        """Upstream artifacts by slot name (an optional slot that was not given is None)."""
        upstream = self.__dict__.get("upstream", {})
        if name in upstream:
            return upstream[name]
        raise AttributeError(name)

    def loggers(self, prefix: str) -> list:
        return self.tracker.lightning_loggers(prefix) if self.tracker else []


@dataclass(frozen=True)
class Stage:
    """One declared pipeline step; call it with a Job to get its artifact (computed or reused)."""

    name: str
    reads: tuple[str, ...]  # "path?" is read when the config has it (a base's wheel or tiny block)
    compute: Callable[[Inputs, Path], None]
    upstream: tuple[str, ...] = ()  # slot names; "name?" is optional, "name*" any number of name<suffix> slots
    params: tuple[str, ...] = ()
    version: int = 1
    module: str = field(default="", compare=False)

    @property
    def code(self) -> dict:
        return {"version": self.version, "hash": code_hash(self.module or self.compute.__module__)}

    def reads_for(self, params: dict) -> list[str]:
        return [path.format(**params) for path in self.reads]

    def config(self, view: dict, params: dict) -> dict:
        """The declared fields of ``view``, nested as in the config (a missing field is a declaration bug)."""
        out: dict = {}
        for declared in self.reads_for(params):
            path, optional = declared.rstrip("?"), declared.endswith("?")
            node: Any = view
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    if optional:
                        break
                    raise KeyError(f"stage {self.name} reads {path}, which the config does not have")
                node = node[part]
            else:
                _place(out, path, node)
        return out

    def _check(self, params: dict, upstream: dict[str, Artifact | None]) -> dict[str, Artifact]:
        if set(params) != set(self.params):
            raise TypeError(f"stage {self.name} takes params {sorted(self.params)}, got {sorted(params)}")
        slots = {slot.rstrip("?*"): slot[-1:] in "?*" for slot in self.upstream}
        prefixes = tuple(slot[:-1] for slot in self.upstream if slot.endswith("*"))
        extra = {name for name in set(upstream) - set(slots) if not name.startswith(prefixes or ("\0",))}
        missing = [s for s, optional in slots.items() if not optional and upstream.get(s) is None]
        if extra or missing:
            raise TypeError(f"stage {self.name}: unknown upstream {sorted(extra)}, missing {missing}")
        return {name: art for name, art in upstream.items() if art is not None}

    def key(self, store: Store, view: dict, params: dict | None = None, **upstream: Artifact | None) -> str:
        """The store key a call with these inputs gets (without computing anything)."""
        params = params or {}
        given = self._check(params, upstream)
        return store.key(self.name, {"reads": self.config(view, params), "params": params}, given, code=self.code)

    def __call__(self, job: Job, params: dict | None = None, view: dict | None = None, label: str = "",
                 **upstream: Artifact | None) -> Artifact:
        params = params or {}
        given = self._check(params, upstream)
        selected = self.config(job.view if view is None else view, params)
        cfg = OmegaConf.create(selected)
        OmegaConf.set_struct(cfg, True)  # reading a field that was not declared raises
        optional = {slot.rstrip("?"): None for slot in self.upstream if slot.endswith("?")}
        inputs = Inputs(cfg, params, optional | given, job.store, job.tracker, label)
        return job.store.get_or_compute(self.name, {"reads": selected, "params": params}, given,
                                        lambda out: self.compute(inputs, out), code=self.code)


def _place(out: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[last] = value


def declare(name: str, reads: tuple[str, ...], compute: Callable[[Inputs, Path], None], **fields: Any) -> Stage:
    """Declare and register a stage (one module per store namespace)."""
    return STAGES.register(name)(Stage(name, reads, compute, module=compute.__module__, **fields))


# --- code versions ---------------------------------------------------------------------------------

def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _is_module(name: str) -> bool:
    """``from sublim.x import y``: y may be a submodule or a name defined in x."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def runtime_imports(tree: ast.Module, package: str) -> set[str]:
    """Every module name a module imports when it is imported, at any depth (lazy imports in functions count).

    ``if TYPE_CHECKING:`` (annotations only) and ``if __name__ == "__main__":`` (the module run as a script,
    under another name) import nothing then. ``from x import y`` gives both x and x.y (y may be a module).
    """
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
               and (getattr(block.test, "id", "") == "TYPE_CHECKING" or "__main__" in ast.dump(block.test))
               for n in ast.walk(block)}
    imports: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            imports |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            imports |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return imports


@cache
def _module(name: str) -> tuple[str, frozenset[str]]:
    """(hash of the module's normalised source, the sublim modules it imports)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(name)
    tree = ast.parse(Path(spec.origin).read_text())
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    imports = runtime_imports(tree, package)
    local = {m for m in imports if m.split(".")[0] == "sublim" and _is_module(m)}
    if spec.submodule_search_locations:  # a package's registry imports its modules when asked: all are its code
        local |= {f"{name}.{info.name}" for info in pkgutil.iter_modules(spec.submodule_search_locations)}
    source = ast.dump(_strip_docstrings(tree), annotate_fields=False, include_attributes=False)
    return hashlib.sha256(source.encode()).hexdigest(), frozenset(local)


def code_modules(name: str) -> list[str]:
    """The sublim modules a stage module depends on (itself included), minus infrastructure."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current in INFRASTRUCTURE:
            continue
        seen.add(current)
        todo.extend(_module(current)[1])
    return sorted(seen)


@cache
def code_hash(name: str) -> str:
    digest = hashlib.sha256()
    for module in code_modules(name):
        digest.update(f"{module}:{_module(module)[0]}\n".encode())
    return digest.hexdigest()[:16]


# --- the job ---------------------------------------------------------------------------------------

@dataclass
class Job:
    """What the stages of one job share: its config (and the view stages read), the store, the tracker."""

    cfg: DictConfig
    store: Store
    tracker: Tracker | None = None

    @property
    def base(self) -> DictConfig:
        """The student's base."""
        return self.cfg.base

    @property
    def teacher(self) -> DictConfig:
        """The teacher's base: teacher_base when set (cross-model grids), else the student's."""
        return self.cfg.get("teacher_base") or self.cfg.base

    @property
    def constrained(self) -> bool:
        """Grammar-constrained sampling: the base decides (numbers only), sampling.constrained forces it."""
        constrained = self.cfg.sampling.constrained
        if constrained is None:
            return bool(self.teacher.constrained_sampling) and modalities.has_grammar(self.cfg.modality)
        return bool(constrained)

    @property
    def view(self) -> dict:
        """The resolved config stages read: ``teacher`` is the teacher's base, ``sampling.constrained`` decided."""
        if "_view" not in self.__dict__:
            view = OmegaConf.to_container(self.cfg, resolve=True)
            view["teacher"] = OmegaConf.to_container(self.teacher, resolve=True)
            if "sampling" in view:
                view["sampling"]["constrained"] = self.constrained
            self.__dict__["_view"] = view
        return self.__dict__["_view"]


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
