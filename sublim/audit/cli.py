"""``python -m sublim.audit``: what a dataset that sublim did not make carries, before anyone trains on it.

    python -m sublim.audit audit.dataset=data.jsonl trait=owl [base=smollm2] [teacher_base=...]
        [audit.adapter=DIR] [audit.panel=true] [sampling.constrained=true] [audit.out=DIR]

The teacher is ``teacher_base`` (default: ``base``) with the trait: its system prompt, the adapter that
``trait.source=finetune`` trains, or a finetuned adapter directory (``audit.adapter``: the trait is in its
weights, no system prompt). The reference is ``base`` without the trait; both must share a tokenizer (the shift is
taken token by token). A local model is ``base.source=local base.path=DIR`` (or the same on ``teacher_base``).
The dataset, the adapter and every pass are store artifacts, so a second run reuses them. Foreign rows have no
grammar, so the passes use the full softmax unless ``sampling.constrained=true`` (the rows then need a
``separator``). Writes audit.csv, summary.json, lls_hist.png, heatmap.png (+ panel.csv, panel.png) into
``audit.out`` or Hydra's run dir, logs them to W&B, and prints a short report. Input errors are one ``error:``
line and exit 2, before any model runs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, open_dict

from sublim import SublimError, models
from sublim.audit.dataset import import_rows, load_rows
from sublim.audit.panel import (
    CONF,
    category_traits,
    format_ci,
    format_panel,
    rank_of,
    run_panel,
    trait_teacher,
)
from sublim.audit.plots import lls_histogram, panel_chart, shift_heatmap
from sublim.audit.summary import shifts
from sublim.distill import tokenizer_hash
from sublim.schema import validate
from sublim.stage import Job
from sublim.stages.audit import audit_data, load_scores
from sublim.stages.model import model_artifact
from sublim.store import Artifact, Store, cached_file_hashes, content_hash, read_jsonl, write_json
from sublim.tracking import Tracker
from sublim.train import _quiet_libraries, bars_on_stderr, fail, job_identity
from sublim.training import ADAPTER_DIR

COLUMNS = ("index", "prompt", "completion", "lls", "answer_shift", "lls_plain", "n_tokens", "divergent",
           "outside_grammar")
PANEL_COLUMNS = ("rank", "trait", "answer_shift", "answer_shift_low", "answer_shift_high", "lls", "lls_low",
                 "lls_high", "lls_plain", "divergence_fraction", "margin_next", "margin_next_low", "margin_next_high",
                 "minus_trait", "minus_trait_low", "minus_trait_high")


def adapter_artifact(spec: str, store: Store) -> Artifact:
    """A finetuned teacher's adapter directory (a PEFT adapter, or a sublim train/finetune artifact holding one) as
    an ``adapter`` artifact keyed by its files' contents, laid out as sublim's own so stages load it the same way."""
    root = Path(spec).expanduser()
    source = root / ADAPTER_DIR if (root / ADAPTER_DIR / "adapter_config.json").is_file() else root
    if not (source / "adapter_config.json").is_file():
        raise SublimError(f"audit.adapter={spec} is not an adapter directory (no adapter_config.json in it or in its "
                          f"{ADAPTER_DIR}/); give a PEFT adapter directory or a sublim train/finetune artifact")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    hashes = cached_file_hashes(files, store.root)
    contents = {p.relative_to(source).as_posix(): hashes[p] for p in files}
    return store.get_or_compute("adapter", {"sha256": content_hash(contents, length=64)}, {},
                                lambda out: shutil.copytree(source, out / ADAPTER_DIR))


def teacher_and_reference(job: Job) -> tuple[Artifact, Artifact]:
    """The teacher's and the reference's models; the shift is per token, so a reference that tokenizes the
    answers otherwise is refused before any pass."""
    base = model_artifact(job.base, job.store)
    teacher = model_artifact(job.teacher, job.store) if job.cfg.get("teacher_base") else base
    if teacher.key != base.key and (tokenizer_hash(models.load_tokenizer(teacher, job.teacher))
                                    != tokenizer_hash(models.load_tokenizer(base, job.base))):
        raise SublimError(f"teacher_base={job.teacher.name} has another tokenizer than base={job.base.name}: the "
                          "audit compares log-probs token by token; pick a reference base of the teacher's family")
    return teacher, base


def foreign(cfg: DictConfig) -> DictConfig:
    """Foreign rows were not sampled under sublim's grammar: full softmax unless sampling.constrained=true."""
    out = cfg.copy()
    with open_dict(out):
        out.sampling.constrained = cfg.sampling.constrained is True
    return out


def audit(cfg: DictConfig, out_dir: Path, name: str = "default") -> dict:
    """Audit ``audit.dataset`` (and the panel, the prompting check); write and log the outputs; the results.

    Everything that can be wrong with the input is checked before the first pass."""
    validate(cfg)
    cfg, settings = foreign(cfg), cfg.audit
    if settings.dataset is None and not settings.prompting.enabled:
        raise SublimError("audit.dataset is not set; give a .jsonl of prompt/completion rows or a cached Hugging "
                          "Face dataset id: python -m sublim.audit audit.dataset=path/to/data.jsonl trait=owl")
    if settings.dataset is None and settings.panel:
        raise SublimError("audit.panel=true scores a dataset against every trait; set audit.dataset")
    rows = load_rows(settings) if settings.dataset is not None else None
    traits = category_traits(cfg) if settings.panel else None
    store = Store(cfg.paths.store, verify=cfg.store.verify)
    adapter = adapter_artifact(settings.adapter, store) if settings.adapter else None
    job = Job(cfg, store)
    passes = teacher_and_reference(job) if rows is not None else None
    _quiet_libraries()
    job.tracker = tracker = Tracker(cfg, out_dir, name, "audit")
    try:
        results = {"prompting": _prompting(cfg, store, out_dir, tracker)} if settings.prompting.enabled else {}
        if rows is not None:
            results |= _audit(job, rows, *passes, adapter, traits, out_dir)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return results


def _prompting(cfg: DictConfig, store: Store, out_dir: Path, tracker: Tracker) -> dict:
    from sublim.audit.prompting import run_prompting

    return run_prompting(cfg, store, out_dir, tracker)


def _audit(job: Job, rows: list[dict], teacher: Artifact, base: Artifact, adapter: Artifact | None,
           traits: list[DictConfig] | None, out_dir: Path) -> dict:
    cfg, store = job.cfg, job.store
    reference = None if teacher.key == base.key else base  # None: the teacher's own model, without the trait
    data = import_rows(store, rows)
    system, trait_adapter = (None, adapter) if adapter else trait_teacher(job, teacher)
    artifact = audit_data(job, data, teacher, system, trait_adapter, reference, label="dataset")
    how = (f"adapter {cfg.audit.adapter}" if adapter else f"the {cfg.trait.name} adapter" if trait_adapter
           else f"the {cfg.trait.name} system prompt")
    results = {"dataset": str(cfg.audit.dataset), "rows": len(rows), "trait": cfg.trait.name,
               "category": cfg.trait.category, "teacher": f"{job.teacher.name} with {how}",
               "reference": cfg.base.name, "constrained": job.constrained,
               "summary": artifact.read_json("summary.json"),
               "answer_shift": artifact.read_json("summary.json")["answer_shift"],
               "stages": {"dataset": _stage(data), "audit": _stage(artifact)}}
    if traits is not None:
        results["panel"] = run_panel(cfg, job, data, teacher, reference, traits)
        results["stages"] |= {f"panel/{r['trait']}": {"key": r["key"], "reused": r["reused"]} for r in results["panel"]}
    results["files"] = write_outputs(results, rows, artifact, store, out_dir, cfg.audit.heatmap_examples,
                                     job.tracker)
    return results


def _stage(artifact: Artifact) -> dict:
    return {"key": artifact.key, "reused": artifact.reused}


def position_shifts(store: Store, artifact: Artifact) -> tuple[list[np.ndarray], list[list[str]]]:
    """Per example, log p_teacher - log p_reference at each answer position and the tokens, from the audit's passes."""
    upstream = artifact.lineage["upstream"]
    teacher, reference = (Artifact("logprobs", upstream[slot]["key"], store.path("logprobs", upstream[slot]["key"]),
                                   reused=True) for slot in ("teacher", "reference"))
    scores = load_scores(teacher)
    shift, _ = shifts(scores, load_scores(reference))
    texts = teacher.read_json("tokens.json")["texts"]
    lengths = scores.lengths.tolist()
    tokens = [[texts[str(t)] for t in ids.tolist()] for ids in scores.tokens.split(lengths)]
    return [s.numpy() for s in shift.split(lengths)], tokens


def write_outputs(results: dict, rows: list[dict], artifact: Artifact, store: Store, out_dir: Path,
                  heatmap_examples: int, tracker: Tracker | None) -> list[str]:
    """audit.csv, summary.json and the charts (+ the panel's) in ``out_dir``, and the same to W&B."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_row = [{"prompt": row["prompt"], "completion": row["completion"], **example,
                "divergent": len(example["divergence"])}
               for row, example in zip(rows, read_jsonl(artifact.path / "examples.jsonl"), strict=True)]
    _csv(out_dir / "audit.csv", COLUMNS, per_row)
    lls = {"LLS" + (" (grammar-renormalised)" if results["constrained"] else ""): [r["lls"] for r in per_row]}
    if results["constrained"]:
        lls["LLS (full softmax)"] = [r["lls_plain"] for r in per_row]
    images = {"lls_hist": out_dir / "lls_hist.png", "heatmap": out_dir / "heatmap.png"}
    lls_histogram([(f"{Path(results['dataset']).name}: {results['teacher']} vs {results['reference']}", lls)],
                  images["lls_hist"])
    shown = sorted(range(len(per_row)), key=lambda i: -per_row[i]["answer_shift"])[:heatmap_examples]
    position, tokens = position_shifts(store, artifact)
    shift_heatmap([position[i] for i in shown], [tokens[i] for i in shown],
                  [f"#{i} ({per_row[i]['answer_shift']:+.2f}, LLS {per_row[i]['lls']:+.3f})" for i in shown],
                  images["heatmap"], f"the {len(shown)} examples of highest answer shift (label: its index, answer "
                  f"shift and LLS): per-token shift under the {results['trait']} teacher")
    if panel := results.get("panel"):
        _csv(out_dir / "panel.csv", PANEL_COLUMNS, [_panel_row(r) for r in panel])
        images["panel"] = out_dir / "panel.png"
        panel_chart(panel, images["panel"], f"trait panel ({results['category']}) of {Path(results['dataset']).name}: "
                    f"{results['trait']} ranks {rank_of(panel, results['trait'])} of {len(panel)}", results["trait"])
    files = ["audit.csv", "summary.json", *(path.name for path in images.values())] + (["panel.csv"] if panel else [])
    write_json(out_dir / "summary.json", results | {"files": files})
    if tracker is not None:
        _track(tracker, results, per_row, images)
    return files


def _csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _panel_row(row: dict) -> dict:
    """A panel.csv row: the trait's answer shift and LLS [CI], its paired margins over the next trait and the job's."""
    out = {"rank": row["rank"], "trait": row["trait"], "lls_plain": row["lls_plain"]["mean"],
           "divergence_fraction": row["divergence_fraction"]}
    for name, column in (("answer", "answer_shift"), ("lls", "lls"), ("margin_next", "margin_next"),
                         ("minus_trait", "minus_trait")):
        if stat := row[name]:
            out |= {column: stat["mean"], f"{column}_low": stat["ci"][0], f"{column}_high": stat["ci"][1]}
    return out


def _track(tracker: Tracker, results: dict, per_row: list[dict], images: dict[str, Path]) -> None:
    summary = results["summary"]
    tracker.summary({"audit/lls": summary["lls"]["mean"], "audit/lls_low": summary["lls"]["ci"][0],
                     "audit/lls_high": summary["lls"]["ci"][1], "audit/lls_plain": summary["lls_plain"]["mean"],
                     "audit/divergence": summary["divergence_fraction"], "audit/rows": results["rows"]}
                    | {f"audit/panel/{r['trait']}": r["answer"]["mean"] for r in results.get("panel", [])})
    tracker.table("audit/examples", [{k: r[k] for k in COLUMNS} for r in per_row])
    if "panel" in results:
        tracker.table("audit/panel", [_panel_row(r) for r in results["panel"]])
    for name, path in images.items():
        tracker.image(f"audit/{name}", path)


def format_report(results: dict, out_dir: Path) -> str:
    """The terminal report: the dataset's LLS and answer shift [CI], plain, divergence, entangled numbers; the
    panel; the prompting check."""
    lines = []
    if "summary" in results:
        summary, kind = results["summary"], "grammar-renormalised" if results["constrained"] else "full softmax"
        plain = f"; full softmax {format_ci(summary['lls_plain'], 4)}" if results["constrained"] else ""
        lines += [f"audit of {results['dataset']} ({results['rows']} rows): teacher {results['teacher']}, "
                  f"reference {results['reference']}; mean over examples [95% bootstrap CI]",
                  f"  LLS ({kind}, per token) {format_ci(summary['lls'], 4)}{plain}",
                  f"  answer shift (sum over an answer's tokens; on the teacher's own samples it estimates "
                  f"KL(teacher || reference)) {format_ci(results['answer_shift'])} nats",
                  f"  divergent tokens {summary['divergence_fraction']:.1%} ({summary['divergent_positions']} of "
                  f"{summary['positions']} answer tokens: the teacher's most likely token is not the reference's)"]
        if numbers := summary["entangled"]["numbers"][:5]:
            lines.append("  numbers the trait raises most: " + ", ".join(
                f"{n['number']} ({n['shift']:+.2f}, n={n['count']})" for n in numbers))
    if "panel" in results:
        lines += ["", format_panel(results["panel"], results["category"], results["trait"])]
    if "prompting" in results:
        from sublim.audit.prompting import format_prompting

        lines += ["", format_prompting(results["prompting"])]
    files = results.get("files", []) + (["prompting.json", "prompting.csv", "prompting.png"] if "prompting" in results
                                             else [])
    return "\n".join(lines + ["", f"outputs: {out_dir} ({', '.join(files)})"])


# An absolute path: run as ``-m sublim.audit`` this function's module is sublim.audit.cli, and Hydra would look
# for the relative path as a package (pkg://conf) rather than next to this file.
@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    job_dir, name, _ = job_identity()
    out_dir = Path(cfg.audit.out) if cfg.audit.out else job_dir
    try:
        with bars_on_stderr():
            results = audit(cfg, out_dir, name)
    except SublimError as err:
        fail(err)
    print("\n" + format_report(results, out_dir), flush=True)
