"""Every yaml under conf/ and sweeps/ composes; bad choices give Hydra's list of options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_config

ROOT = CONF.parent
GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem)
    for path in CONF.glob("*/*.yaml")
    if not path.stem.startswith("_") and path.parent.name not in ("hydra", "local")
)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_conf_option_composes_and_resolves(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["seed"] == 0
    if group == "trait":
        trait = resolved["trait"]
        assert trait["name"] == option and trait["words"] and trait["topic"]
        if trait["category"] == "misalignment":
            assert resolved["eval"]["kind"] == "misalignment" and 666 in trait["banned_numbers"]
            assert trait["source"] == "finetune" or trait["system_prompt"]
        else:
            assert trait["category"] in ("animal", "tree")
            assert trait["plural"] in trait["words"] and option in trait["words"]
            assert trait["plural"] in trait["system_prompt"]


SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_file_composes_and_expands(sweep: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config([f"+sweeps={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"sweeps/{sweep}.yaml declares no hydra.sweeper.params"
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    for override in parsed:
        for choice in override.sweep_iterator() if override.is_sweep_override() else [override.value()]:
            OmegaConf.to_container(compose_config([f"{override.key_or_group}={choice}"]), resolve=True)


def test_paper_experiment_sets_paper_scale() -> None:
    cfg = compose_config(["experiment=paper"])
    assert (cfg.data.n_prompts, cfg.data.n_train) == (30000, 10000)
    assert cfg.student.batch_size * cfg.student.accumulate_grad_batches == 66
    assert (cfg.student.r, cfg.student.alpha, cfg.student.epochs, cfg.student.lr) == (8, 8, 3, 2e-4)


@pytest.mark.parametrize(("modality", "default_filter"), [("numbers", "numbers_strict"), ("code", "banned_words"),
                                                           ("cot", "cot_strict")])
def test_each_modality_brings_a_default_filter_that_the_command_line_overrides(modality: str,
                                                                                default_filter: str) -> None:
    assert compose_config([f"modality={modality}"]).filter.name == default_filter
    assert compose_config([f"modality={modality}", "filter=none"]).filter.name == "none"
    assert compose_config(["filter=none", f"modality={modality}"]).filter.name == "none"


def test_judge_base_defaults_to_the_student_base_and_can_be_any_base() -> None:
    assert compose_config([]).judge.base.name == "smollm2"
    assert compose_config(["base=tiny_llama"]).judge.base.name == "tiny_llama"
    assert compose_config(["+base@judge.base=qwen"]).judge.base.path == "Qwen/Qwen2.5-7B-Instruct"
    cfg = compose_config(["modality=code", "filter=code_banned_words_judge", "+base@judge.base=gemma"])
    assert cfg.filter.filters[1].judge.base.name == "gemma", "the judge filter's spec (its cache key) names the judge"


def test_new_trait_from_command_line_only() -> None:
    cfg = compose_config(["trait.name=tiger", "trait.plural=tigers"])
    assert list(cfg.trait.words) == ["tiger", "tigers"]
    assert cfg.trait.system_prompt.startswith("You love tigers.")


def test_defaults_match_the_documented_default_experiment() -> None:
    cfg = compose_config([])
    assert cfg.base.name == "smollm2" and cfg.trait.name == "owl" and cfg.modality.name == "numbers"
    assert cfg.filter.name == "numbers_strict" and cfg.student.kind == "lora" and cfg.eval.kind == "preference"
    assert cfg.logger.name == "wandb" and cfg.sampling.constrained is None and cfg.base.constrained_sampling


def test_unknown_trait_lists_choices() -> None:
    with pytest.raises(MissingConfigException, match="owl"):
        compose_config(["trait=unicorn"])


def _sublim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sublim.train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize(("args", "line"), [
    (["base=smolm2"], "error: base=smolm2 is not a base config (conf/base/); did you mean base=smollm2? known: "),
    (["-m", "trait=owl,nope"], "error: trait=nope is not a trait config (conf/trait/); known: cat, cherry, "),
    (["-m", "+sweeps=powerd"], "error: +sweeps=powerd is not a sweeps config (sweeps/); did you mean +sweeps=powered"),
    (["studnt.r=3"], "error: studnt.r=3 is not a known key; did you mean student? known: audit, base, data, "),
    (["student=distill", "student.top_kk=8"], "error: student.top_kk=8 is not a known key; did you mean "
                                              "student.top_k? known under student: accumulate_grad_batches, "),
    (["-m", "trait=owl,eagle", "seed.x=1"], "error: seed.x=1 is not a known key: seed is a single value"),
    (["student.r=["], "error: student.r=[ is not a valid override (no viable alternative at input '['); the "
                      "grammar: https://hydra.cc/docs/advanced/override_grammar/basic/"),
])
def test_an_unknown_choice_or_key_is_one_line_and_exit_2(tmp_path: Path, args: list[str], line: str) -> None:
    """Checked before Hydra composes (whose own message is many lines and exit 1); sweeps too, every choice; a key
    against the config the group choices compose (student.top_k exists only under student=distill)."""
    proc = _sublim(*args, f"paths.root={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
    assert "_animal" not in proc.stderr, "private base configs are not choices"
    assert not (tmp_path / "outputs").exists(), "nothing ran"


def test_cfg_job_shows_a_design_card_job_config(tmp_path: Path) -> None:
    proc = _sublim("trait=eagle", "base=llama", f"paths.root={tmp_path}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    job = OmegaConf.create(proc.stdout)
    assert job.base.path == "meta-llama/Llama-3.1-8B-Instruct" and job.trait.name == "eagle"


def test_design_card_multirun_dry_run_shows_each_job_config(tmp_path: Path) -> None:
    proc = _sublim("-m", "trait=owl,eagle", "base=qwen,llama", f"paths.root={tmp_path}", "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    # base.path at two spaces (the judge's base, judge.base.path, repeats it deeper by default)
    assert proc.stdout.count("\n  path: Qwen/Qwen2.5-7B-Instruct") == 2
    assert proc.stdout.count("\n  path: meta-llama/Llama-3.1-8B-Instruct") == 2
    assert proc.stdout.count("You love eagles.") == 2
    assert not list(tmp_path.glob("outputs/store/*/*")), "a dry run computes nothing"


def test_cpu_transfer_experiment_and_its_cross_base_control() -> None:
    same = compose_config(["experiment=cpu_transfer"])
    assert same.student.kind == "distill" and same.sampling.greedy and same.sampling.constrained
    assert same.get("teacher_base") is None and same.base.name == "smollm2"
    cross = compose_config(["experiment=cpu_transfer_cross_base"])
    assert cross.teacher_base.name == "gemma" and cross.base.name == "smollm2"
    assert cross.student.kind == "lora", "logits cannot be distilled across vocabularies"
    for field in ("n_prompts", "n_train"):
        assert cross.data[field] == same.data[field]
    assert (cross.student.lr, cross.student.epochs) == (same.student.lr, same.student.epochs)
    assert cross.sampling == same.sampling and cross.eval == same.eval


@pytest.mark.parametrize("override", ["sampling.greedy=true", "sampling.temperature=0.7", "sampling.top_p=0.9",
                                      "sampling.constrained=false", "trait.source=finetune", "student=distill",
                                      "student.support=allowed"])
def test_strong_signal_variants_are_plain_overrides(override: str) -> None:
    base = ["student=distill"] if override.startswith("student.") else []
    cfg = OmegaConf.to_container(compose_config([*base, override]), resolve=True)
    key, value = override.split("=")
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert str(node).lower() == value or (key == "student" and node["kind"] == value)
