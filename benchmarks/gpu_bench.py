"""The GPU check's helper (benchmarks/gpu_check.sh runs it; docs/gpu.md): which of sublim's dependencies an image
lacks, the wheels folder that brings them without network, a CPU vs CUDA benchmark, and the summary.

    python benchmarks/gpu_bench.py deps [--install] [--wheels DIR]    # what is missing; install it from DIR
    python benchmarks/gpu_bench.py fill DIR [--only NAME ...] [--have FILE] [--all] [--python-version 3.12]
    python benchmarks/gpu_bench.py bench [--size small] [--out FILE]  # tokens/s on the CPU and on CUDA
    python benchmarks/gpu_bench.py summary --junit FILE [--bench FILE]

``deps``, ``fill`` and ``summary`` need the standard library and pip only: they run before anything is installed.

What the check imports (``IMPORT_TIME``): sublim's modules import torch, transformers, tokenizers, peft,
pytorch-lightning, numba, threadpoolctl, hydra-core and omegaconf, numpy, pydantic, scipy and tqdm when loaded;
pytest runs the tests. wandb (``logger=wandb``), datasets (hub datasets of ``trait.finetune``, mnist_aux), gguf
(the GGUF base), matplotlib (sweep reports), scikit-learn (mnist_aux) and the joblib launcher are imported only
where a config uses them: the GPU check runs without them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare image has pip, which carries its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

IMPORT_TIME = {"torch", "transformers", "tokenizers", "peft", "pytorch-lightning", "numba", "threadpoolctl",
               "hydra-core", "omegaconf", "numpy", "pydantic", "scipy", "tqdm"}
TEST_RUNNER = "pytest>=8"
LAZY = {"wandb": "logger=wandb", "datasets": "hub datasets (trait.finetune, mnist_aux)", "gguf": "the GGUF base",
        "matplotlib": "sweep reports", "scikit-learn": "mnist_aux", "hydra-joblib-launcher": "hydra/launcher=joblib"}
# Never installed from the folder: the image's CUDA build of torch (and what comes with it) stays.
IMAGE_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# pip download's platform tags for a CUDA image on x86-64 (pip matches manylinux_2_N exactly).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 38, 39)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]


def sublim_requirements() -> list[Requirement]:
    """pyproject.toml's [project] dependencies (no install of sublim needed)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # Python 3.10: the entries are the quoted strings that open a line
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        deps = re.findall(r'^\s*"([^"]+)"', block, re.M)
    return [Requirement(d) for d in deps]


def check_requirements() -> list[Requirement]:
    """What the GPU check imports, with sublim's version ranges, and pytest."""
    return [r for r in sublim_requirements() if canonicalize_name(r.name) in IMPORT_TIME] + [Requirement(TEST_RUNNER)]


def installed(name: str) -> Version | None:
    from importlib import metadata

    try:
        return Version(metadata.version(name))
    except (metadata.PackageNotFoundError, InvalidVersion):
        return None


def wheels_in(folder: Path | None) -> dict[str, tuple[Version, Path]]:
    """The folder's wheels by project name (one version each)."""
    found: dict[str, tuple[Version, Path]] = {}
    for path in sorted(folder.glob("*.whl")) if folder and folder.is_dir() else []:
        name, version = path.name.split("-")[:2]
        found[canonicalize_name(name)] = (Version(version), path)
    return found


def pip(*args: str, offline: bool = True, quiet: bool = False) -> int:
    """Run this interpreter's pip. offline: no pip config or PIP_* settings (their find-links, indexes or
    constraints): only what the command names. quiet: its output only when it fails (the last lines)."""
    env = None
    if offline:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
            "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    print("$ pip " + " ".join(args), flush=True)
    if not quiet:
        return subprocess.call([sys.executable, "-m", "pip", *args], env=env)
    done = subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        print("\n".join((done.stdout + done.stderr).strip().splitlines()[-6:]), flush=True)
    return done.returncode


# --- deps: what this interpreter lacks, installed from the wheels folder ------------------------------------------


def deps(folder: Path | None, install: bool) -> int:
    wheels = wheels_in(folder)
    if folder is None or not folder.is_dir():
        print(f"wheels folder {folder}: not there; using what is installed (fill it: bash benchmarks/gpu_check.sh "
              "--fill-wheels on a networked machine, docs/gpu.md)")
    else:
        print(f"wheels folder {folder}: {len(wheels)} wheels")
    to_install, problems = [], []
    rows = [(r, True) for r in check_requirements()] + [
        (r, False) for r in sublim_requirements() if canonicalize_name(r.name) not in IMPORT_TIME]
    for req, needed in rows:
        name = canonicalize_name(req.name)
        have = installed(name)
        ok = have is not None and req.specifier.contains(have, prereleases=True)
        state = f"{have}" if ok else ("missing" if have is None else f"{have}, outside {req.specifier}")
        wheel = wheels.get(name)
        if ok:
            action = ""
        elif IMAGE_ONLY.match(name):
            action = "kept: the image's own build" + ("" if have else " (none: the check cannot run)")
            problems += [] if have else [name]
        elif wheel and req.specifier.contains(wheel[0], prereleases=True):
            action = f"install {wheel[1].name}"
            to_install.append(f"{name}=={wheel[0]}")
        elif needed:
            action = "NO WHEEL: " + ("imports will fail" if have is None else "the installed version is used")
            problems += [name] if have is None else []
        else:
            action = f"not needed by the check (only for {LAZY.get(name, 'other configs')})"
        print(f"  {str(req):34} {state:28} {action}")
    if problems:
        print(f"missing and not in the wheels folder: {', '.join(problems)}")
    if not install:
        return 1 if problems else 0
    rc = install_wheels(folder, to_install) if to_install else 0
    # sublim itself from this checkout, editable, without its dependencies (handled above)
    if pip("install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--no-warn-script-location", "-e",
           str(ROOT), quiet=True):
        print(f"sublim could not be installed (editable) with this pip/setuptools: it is imported from {ROOT} "
              "(PYTHONPATH), which the check sets anyway")
    return 1 if rc or problems else 0


def install_wheels(folder: Path, to_install: list[str]) -> int:
    rc = pip("install", "--no-index", "--find-links", str(folder), "--no-cache-dir", "--no-warn-script-location",
             *to_install)
    if rc:  # a dependency of theirs the folder lacks (an image's older pin, say): each on its own, without deps
        print("installing with their dependencies failed; installing each without its dependencies", flush=True)
        rc = max(pip("install", "--no-index", "--no-deps", "--find-links", str(folder), "--no-cache-dir",
                     "--no-warn-script-location", spec) for spec in to_install)
        pip("check")
    return rc


# --- fill: the wheels folder, on a networked machine that has sublim's dependencies installed ----------------------


def read_have(path: Path | None) -> dict[str, Version | None]:
    """An image's packages (``pip list --format=freeze``; a bare name: there, version unknown)."""
    have: dict[str, Version | None] = {}
    for line in path.read_text().splitlines() if path else []:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            have[canonicalize_name(name.strip())] = Version(version.strip()) if version.strip() else None
    return have


def pins(roots: list[Requirement], have: dict[str, Version | None], python_version: str | None,
         follow: bool) -> dict[str, Version]:
    """name -> the version installed here, for the roots and (follow) everything they need that the image lacks."""
    from importlib import metadata

    env = default_environment()
    if python_version:
        env |= {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    chosen: dict[str, Version] = {}
    stack = [(r, {""}) for r in roots]
    while stack:
        req, extras = stack.pop()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        there = name in have and (have[name] is None or req.specifier.contains(have[name], prereleases=True))
        if name in chosen or IMAGE_ONLY.match(name) or name == "sublim" or there:
            continue
        version = installed(name)
        if version is None:
            raise SystemExit(f"{name} is not installed here: fill the folder where sublim's dependencies are "
                             f"installed (make install-test), the versions sublim was tested with")
        if not req.specifier.contains(version, prereleases=True):
            print(f"warning: {name} {version} here does not satisfy {req}")
        chosen[name] = version
        for child in (metadata.requires(name) or []) if follow else []:
            stack.append((Requirement(child), {"", *req.extras}))
    return chosen


def fill(folder: Path, only: list[str], have_file: Path | None, everything: bool, python_version: str | None) -> int:
    if only:
        roots, follow = [Requirement(n) for n in only], False
    else:
        roots = (sublim_requirements() + [Requirement(TEST_RUNNER)]) if everything else check_requirements()
        follow = True
    chosen = pins(roots, read_have(have_file), python_version, follow)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (version, path) in wheels_in(folder).items():  # one version of each: two stop the install
        if name in chosen and version != chosen[name]:
            path.unlink()
    target = ["--python-version", python_version, "--implementation", "cp",
              *[a for p in PLATFORMS for a in ("--platform", p)]] if python_version else []
    failed = []
    for name, version in sorted(chosen.items()):
        spec = f"{name}=={version}"
        if pip("download", "--no-deps", "--only-binary=:all:", "-d", str(folder), "-q", *target, spec, offline=False):
            # no wheel on the index (antlr4-python3-runtime 4.9.3 is a source release): build one here, which
            # serves any Python only where it is pure Python
            if pip("wheel", "--no-deps", "-w", str(folder), "-q", spec, offline=False):
                failed.append(spec)
            elif python_version and not any(
                    p.name.endswith("-none-any.whl") for p in folder.glob(f"{name.replace('-', '_')}-{version}-*")):
                failed.append(f"{spec} (built for this Python only)")
    (folder / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(chosen.items())))
    size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB ({', '.join(sorted(chosen))})")
    if failed:
        print(f"could not fetch: {', '.join(failed)}")
    return 1 if failed else 0


# --- bench: constrained sampling and LoRA training, tokens/s on the CPU and on CUDA in one process -----------------

SIZES = {  # base=tiny_llama overrides: tiny is the test base (0.1M parameters), small ~3M, medium ~24M
    "tiny": [],
    "small": ["base.tiny.hidden_size=256", "base.tiny.num_layers=4", "base.tiny.num_heads=4",
              "base.tiny.num_kv_heads=2", "base.tiny.intermediate_size=704"],
    "medium": ["base.tiny.hidden_size=512", "base.tiny.num_layers=8", "base.tiny.num_heads=8",
               "base.tiny.num_kv_heads=4", "base.tiny.intermediate_size=1408"],
}


def bench(size: str, n_prompts: int, n_examples: int, repeats: int, out: Path | None) -> int:
    import random
    import statistics
    import tempfile
    import time
    from contextlib import contextmanager

    import pytorch_lightning as pl
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import config, load_base, table

    from sublim import modalities
    from sublim.student import train_lora
    from sublim.teacher import Sampler, sample_chats
    from sublim.train import _quiet_libraries

    _quiet_libraries()
    store = tempfile.mkdtemp(prefix="gpu_bench_")
    cfg = config("base=tiny_llama", f"paths.root={store}", "modality.prompt_style=paper", *SIZES[size])
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]

    @contextmanager
    def held(device: str):
        """Lightning's Trainer (sublim asks for accelerator="auto") held to one device."""
        original = pl.Trainer

        class Held(original):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **{**kwargs, "accelerator": "cpu" if device == "cpu" else "gpu",
                                           "enable_progress_bar": False})

        pl.Trainer = Held
        try:
            yield
        finally:
            pl.Trainer = original

    prompts = modalities.prompt_rows(cfg.modality, n_prompts, cfg.seed)
    for row in prompts:
        row["messages"] = [{"role": "system", "content": cfg.trait.system_prompt},
                           {"role": "user", "content": row["prompt"]}]
    rng = random.Random(cfg.seed)
    examples = [{"prompt": r["prompt"], "completion": r["separator"].join(
        str(rng.randint(0, 999)) for _ in range(rng.randint(5, cfg.modality.answer_count)))} for r in prompts]
    examples = (examples * (n_examples // len(examples) + 1))[:n_examples]
    net, tokenizer = load_base(cfg)
    params = sum(p.numel() for p in net.parameters())

    work: dict[str, str] = {}  # what one run of a task processes, for the printout

    def sample(device: str, precision: str, rows: list[dict]) -> float:
        net, tokenizer = load_base(cfg)
        sampler = Sampler(net, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.seed,
                          grammar=lambda row: modalities.grammar(cfg.modality, row))
        with held(device):
            start = time.perf_counter()
            done = sample_chats(sampler, rows, cfg.sampling.batch_size, precision)
            seconds = time.perf_counter() - start
        generated = sum(r["n_tokens"] + r["finished"] for r in done)  # answer tokens and the EOS ending them
        prompt = sum(len(sampler.encode(r["messages"])) for r in rows)
        work["constrained sampling"] = f"{generated} tokens generated after {prompt} prompt tokens"
        return generated / seconds

    def train(device: str, precision: str, rows: list[dict]) -> float:
        net, tokenizer = load_base(cfg)
        student = cfg.student.copy()
        student.epochs, student.precision = 1, precision
        with held(device), tempfile.TemporaryDirectory() as tmp:
            metrics = train_lora(net, tokenizer, rows, student, cfg.seed, Path(tmp))
        work["LoRA training"] = f"{metrics['tokens']} tokens in {metrics['steps']} steps"
        return metrics["tokens"] / metrics["seconds"]  # every non-padding token of every step, per second of fit

    runs = [("constrained sampling", sample, prompts), ("LoRA training", train, examples)]
    precisions = {"cpu": ["32-true"], "cuda": ["32-true", "bf16-mixed"]}
    results: dict[str, dict[str, float]] = {}  # task and precision -> device -> tokens/s
    print(f"tiny_llama {size} ({params / 1e6:.1f}M parameters), {n_prompts} prompts (batch "
          f"{cfg.sampling.batch_size}, {cfg.sampling.max_new_tokens} new tokens), {n_examples} training examples "
          f"(batch {cfg.student.batch_size}), {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA device'}", flush=True)
    failed: dict[str, str] = {}
    for task, run, rows in runs:
        for device in devices:
            for precision in precisions[device]:
                name = f"{task}, {precision}"
                try:
                    run(device, precision, rows)  # warm-up: CUDA context, numba's compilation, allocator, caches
                    rates = [run(device, precision, rows) for _ in range(repeats)]
                except Exception as err:  # noqa: BLE001 - one failing cell must not hide the others' numbers
                    failed[f"{name}, {device}"] = f"{type(err).__name__}: {err}"
                    print(f"  {task:22} {device:4} {precision:10} FAILED: {type(err).__name__}: {err}", flush=True)
                    continue
                rate = statistics.median(rates)
                results.setdefault(name, {})[device] = rate
                print(f"  {task:22} {device:4} {precision:10} {rate:10.1f} tok/s  ({work[task]})", flush=True)

    def cell(name: str, device: str) -> str:
        if f"{name}, {device}" in failed:
            return "FAILED"
        rate = results.get(name, {}).get(device)
        return f"{rate:.1f}" if rate is not None else ("n/a" if device == "cuda" and not cuda else "-")

    lines = []
    for task, _, _ in runs:
        for precision in precisions["cuda"]:
            name = f"{task}, {precision}"
            gpu, cpu = results.get(name, {}).get("cuda"), results.get(f"{task}, 32-true", {}).get("cpu")
            lines.append([name, cell(name, "cpu"), cell(name, "cuda"), f"{gpu / cpu:.2f}x" if gpu and cpu else "-"])
    report = table(["tokens/s (sampling: generated)", "cpu", "cuda", "cuda / cpu fp32"], lines)
    if failed:
        report += "\n" + "\n".join(f"FAILED {k}: {v}" for k, v in failed.items())
    print("\n" + report, flush=True)
    if out:
        out.write_text(json.dumps({"size": size, "parameters": params, "prompts": n_prompts, "examples": n_examples,
                                   "repeats": repeats, "cpu_threads": torch.get_num_threads(),
                                   "device": torch.cuda.get_device_name() if cuda else None,
                                   "torch": torch.__version__, "work": work, "results": results, "failed": failed,
                                   "table": report}, indent=1))
    return 1 if failed else 0


# --- summary: the tests' counts from pytest's JUnit XML, and the benchmark's table --------------------------------


def summary(junit: Path, bench_file: Path | None) -> int:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    notes: list[str] = []
    skips: dict[str, int] = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name')}"
            outcome = next(((tag, el) for tag, el in ((c.tag, c) for c in case)
                            if tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
                continue
            tag, element = outcome
            counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}[tag]] += 1
            message = ((element.get("message") or "").splitlines() or [""])[0][:160]
            if tag == "skipped":
                skips[message] = skips.get(message, 0) + 1
            else:
                notes.append(f"  {tag.upper():8} {name}: {message}")
    else:
        notes.append(f"  no test report ({junit}): pytest did not run")
    print("GPU tests: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    print("\n".join(notes + [f"  SKIPPED  {n} test(s): {reason}" for reason, n in skips.items()]))
    if bench_file and bench_file.exists():
        print("\nbenchmark:\n" + json.loads(bench_file.read_text())["table"])
    elif bench_file:
        print("\nbenchmark: did not finish (see the log)")
    return 1 if counts["failed"] or counts["errors"] or not junit.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("deps", help="which dependencies are missing; --install: from the wheels folder")
    p.add_argument("--wheels", type=Path, default=ROOT / "benchmarks" / "wheels")
    p.add_argument("--install", action="store_true")
    p = sub.add_parser("fill", help="download the wheels an image lacks (networked machine, sublim installed)")
    p.add_argument("folder", type=Path, nargs="?", default=ROOT / "benchmarks" / "wheels")
    p.add_argument("--only", nargs="+", default=[], help="exactly these projects, at the versions installed here")
    p.add_argument("--have", type=Path, help="the image's `pip list --format=freeze`: what it holds is left out")
    p.add_argument("--all", action="store_true", help="every dependency of sublim, not only what the check imports")
    p.add_argument("--python-version", help="the image's Python (e.g. 3.12) when it is not this one's")
    p = sub.add_parser("bench", help="constrained sampling and LoRA training tokens/s, CPU and CUDA")
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("summary", help="pass/fail/skip counts and the benchmark table")
    p.add_argument("--junit", type=Path, required=True)
    p.add_argument("--bench", type=Path)
    args = parser.parse_args()
    if args.command == "deps":
        return deps(args.wheels, args.install)
    if args.command == "fill":
        return fill(args.folder, args.only, args.have, args.all, args.python_version)
    if args.command == "bench":
        return bench(args.size, args.prompts, args.examples, args.repeats, args.out)
    return summary(args.junit, args.bench)


if __name__ == "__main__":
    sys.exit(main())
