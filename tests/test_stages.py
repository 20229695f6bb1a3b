"""Stages are declarations: one module per store namespace, keys derived from what a stage reads and its code."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf.errors import ConfigAttributeError

from sublim.stage import STAGES, Job, Stage, code_hash, code_modules, runtime_imports
from sublim.store import Artifact, Store, read_jsonl
from tests.conftest import CONF, TINY, compose_config
from tests.test_config import GROUP_OPTIONS

ROOT = CONF.parent
PACKAGE = ROOT / "sublim"


def _imports(path: Path, module: str) -> set[str]:
    """Every sublim module that ``path`` imports at run time, at any depth of the file (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return runtime_imports(ast.parse(path.read_text()), package)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_import_cycle_in_sublim() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ is imported by its submodules implicitly; only real import statements count
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_one_stage_per_module_each_declaring_its_reads() -> None:
    modules = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if not p.stem.startswith("_"))
    assert STAGES.names() == modules, "every stage module declares exactly the stage named after it"
    for name in modules:
        stage = STAGES[name]
        assert stage.module == f"sublim.stages.{name}" and stage.reads, name
        assert stage.code["hash"] and isinstance(stage.code["version"], int)


def _jobs() -> list[list[str]]:
    """Every option of every group, plus the tasks' experiments: the configs a stage may read."""
    options = [[f"{group}={option}"] for group, option in GROUP_OPTIONS if group not in ("experiment", "data")
               or option not in ("mnist_aux", "mnist", "digits")]
    return options + [["student=distill", "student.support=allowed"], ["trait=misaligned"]]


def _leaves(node: object, prefix: str) -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}")]
    return [prefix]


def _perturbed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "x"]
    return "changed" if value is None else {"changed": True}


def _set(view: dict, path: str, value: object) -> dict:
    import copy

    out = copy.deepcopy(view)
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return out


@pytest.mark.parametrize("overrides", _jobs(), ids=lambda o: ",".join(o))
def test_every_field_a_stage_reads_is_in_its_key(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config(["base=tiny_llama", *overrides])
    if cfg.task != "subliminal":
        pytest.skip("the mnist_aux task has no stages")
    store = Store(tmp_path)
    view = Job(cfg, store).view
    for name in STAGES.names():
        stage = STAGES[name]
        params = {p: f"<{p}>" for p in stage.params}
        stage_view = view["base"] if name == "model" else view
        try:
            selected = stage.config(stage_view, params)
        except KeyError:
            continue  # a stage this config does not run (e.g. judge fields of a preference eval)
        upstream = {slot.rstrip("?*"): Artifact(slot, "k" + slot, tmp_path, False) for slot in stage.upstream}
        key = stage.key(store, stage_view, params, **upstream)
        paths = [leaf for field, value in selected.items() for leaf in _leaves(value, field)]
        assert paths, name
        for path in paths:
            changed = stage.key(store, _set(stage_view, path, _perturbed(_get(stage_view, path))), params, **upstream)
            assert changed != key, f"stage {name}: {path} is read but not keyed"
        for param in params:
            assert stage.key(store, stage_view, params | {param: "other"}, **upstream) != key, (name, param)
        for slot in upstream:
            other = upstream | {slot: Artifact(slot, "other", tmp_path, False)}
            assert stage.key(store, stage_view, params, **other) != key, (name, slot)


def _get(view: dict, path: str) -> object:
    node = view
    for part in path.split("."):
        node = node[part]
    return node


def test_compute_sees_only_the_declared_fields(tmp_path: Path) -> None:
    seen = {}

    def compute(inputs, out: Path) -> None:
        seen["seed"] = inputs.cfg.seed
        inputs.cfg.data.n_train  # noqa: B018 -- not declared: must raise

    stage = Stage("probe", ("seed",), compute, module="tests.test_stages")
    job = Job(compose_config(["base=tiny_llama"]), Store(tmp_path))
    with pytest.raises(ConfigAttributeError):
        stage(job)
    assert seen == {"seed": 0}
    assert not list((tmp_path / "probe").glob("*/lineage.json")), "a failed compute leaves no artifact"


def test_code_hash_follows_the_code_not_its_comments(tmp_path: Path) -> None:
    assert "sublim.filters" in code_modules("sublim.stages.filter"), "a stage's code includes what it calls"
    assert "sublim.store" not in code_modules("sublim.stages.filter"), "infrastructure is not a stage's code"
    package = tmp_path / "sublim"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    filters = package / "filters.py"

    def hash_after(old: str, new: str) -> str:
        filters.write_text(filters.read_text().replace(old, new, 1))
        script = "from sublim.stage import code_hash; print(code_hash('sublim.stages.filter'))"
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    original = hash_after("", "")
    assert original == code_hash("sublim.stages.filter"), "the copy hashes like the package"
    assert hash_after('"""Filter registry', '"""The filter registry') == original, "a docstring is not code"
    assert hash_after("# Runs of digits", "# Maximal runs of digits") == original, "a comment is not code"
    assert hash_after("max_digits: int = 3", "max_digits: int = 2") != original


def _copy_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for name in ("sublim", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _train(root: Path, store_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "sublim.train", "base=tiny_llama", *TINY, "logger=none",
                           f"paths.root={store_root}", *overrides], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def _results(store_root: Path) -> dict:
    import json

    runs = sorted(store_root.glob("outputs/runs/*/*/results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text())


@pytest.mark.slow
def test_editing_a_filter_or_a_prompt_template_recomputes_what_it_changes(tmp_path: Path) -> None:
    """The two stale-cache reproductions: the same command after a code edit must not reuse pre-edit results."""
    root = _copy_checkout(tmp_path)
    first = _train(root, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _results(tmp_path)
    kept_before = before["arms"]["treatment"]["filter"]["kept"]

    filters = root / "sublim" / "filters.py"  # a code edit, the config untouched: reject numbers over 499
    text = filters.read_text()
    assert "if any(x > self.max_value for x in numbers):" in text
    filters.write_text(text.replace("if any(x > self.max_value for x in numbers):",
                                    "if any(x > min(self.max_value, 499) for x in numbers):"))
    second = _train(root, tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    after = _results(tmp_path)
    assert not after["stages"]["filter/treatment"]["reused"]
    assert after["stages"]["sample/treatment"] == before["stages"]["sample/treatment"] | {"reused": True}
    assert after["arms"]["treatment"]["filter"]["kept"] < kept_before, "numbers over 499 are now rejected"

    numbers = root / "sublim" / "modalities" / "numbers.py"  # the short prompts' wording
    text = numbers.read_text()
    assert '"Continue: {numbers}.' in text
    numbers.write_text(text.replace('"Continue: {numbers}.', '"Extend: {numbers}.'))
    third = _train(root, tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    rerun = _results(tmp_path)
    assert not rerun["stages"]["prompts"]["reused"] and not rerun["stages"]["sample/treatment"]["reused"]
    store = Store(tmp_path / "outputs" / "store")
    prompts = list(read_jsonl(store.path("prompts", rerun["stages"]["prompts"]["key"]) / "prompts.jsonl"))
    assert prompts and all(p["prompt"].startswith("Extend: ") for p in prompts)
