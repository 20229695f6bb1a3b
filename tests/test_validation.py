"""Configs are checked before any work: every shipped option validates, and a bad one stops the job (or the
whole sweep) at once with one ``error: <field>=<value> <problem>; <fix>`` line, exit code 2, nothing computed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sublim import SublimError
from sublim.schema import ConfigError, sweep_problems, validate
from sublim.schema.groups import misalignment_shape
from tests.conftest import CATEGORY_TARGETS, CONF, TINY, compose_config

ROOT = CONF.parent
GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem)
    for path in CONF.glob("*/*.yaml")
    if not path.stem.startswith("_") and path.parent.name not in ("hydra", "local")
)
# Options of task=mnist_aux's own groups: they belong with experiment=mnist_aux (alone they are refused, below).
MNIST_AUX_ONLY = {("data", "digits"), ("data", "mnist"), ("eval", "mnist_aux"), ("student", "mlp_aux")}
SWEEPS = sorted(path.stem for path in (ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_conf_option_validates(group: str, option: str) -> None:
    extra = ["experiment=mnist_aux"] if (group, option) in MNIST_AUX_ONLY else []
    validate(compose_config([*extra, f"{group}={option}"]))


@pytest.mark.parametrize("overrides", [
    [], TINY, ["base=tiny_llama", *TINY], ["experiment=paper"], ["experiment=cpu_transfer"],
    ["experiment=cpu_transfer_cross_base"], ["experiment=mnist_aux", "data=mnist", "student.loss=kl"],
    ["modality=code", "filter=code_banned_words_judge", "judge=api"], ["modality=cot", "filter=cot_judge"],
    ["trait=misaligned", "modality=code", "filter=code_banned_words_judge", "+base@judge.base=qwen"],
    ["student=distill", "student.support=allowed", "sampling=vllm"], ["sampling.temperature=0", "sampling.greedy=true"],
    ["teacher_base=gemma", "trait.name=tiger", "trait.plural=tigers"],
    ["store.verify=true", "student.devices=auto", "student.strategy=ddp", "student.precision=bf16-mixed"],
    ["student.precision=32", "trait.source=finetune", CATEGORY_TARGETS],
], ids=lambda overrides: " ".join(overrides) or "default")
def test_combinations_validate(overrides: list[str]) -> None:
    validate(compose_config(overrides))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_job_of_every_sweep_file_validates(sweep: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert sweep_problems(compose("config", [f"+sweeps={sweep}"], return_hydra_config=True)) == []


def test_a_bad_override_is_reported_once_for_a_whole_sweep() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        lines = sweep_problems(compose("config", ["+sweeps=animals", "data.n_train=0"], return_hydra_config=True))
    assert lines == ["error: [trait=owl and 9 more jobs] data.n_train=0 must be >= 1; set data.n_train to 1 or more"]


# (overrides, the line's start "<field>=<value> ", a piece of the fix)
BAD = [
    (["data.n_train=0"], "data.n_train=0 must be >= 1", "set data.n_train to 1 or more"),
    (["sampling.batch_size=0"], "sampling.batch_size=0 ", "set sampling.batch_size to 1 or more"),
    (["sampling.temperature=0"], "sampling.temperature=0.0 must be > 0 unless sampling.greedy=true",
     "or sampling.greedy=true"),
    (["eval.n_questions=1000"], "eval.n_questions=1000 is more than the 50 animal questions",
     "set eval.n_questions to at most 50"),
    (["trait=oak", "eval.n_questions=51"], "eval.n_questions=51 ", "at most 50"),
    (["+student.epochz=3"], "student.epochz=3 is not a known key", "did you mean student.epochs?"),
    (["filter.filters.0.name=numbers_strikt"], "filter.filters.0.name=numbers_strikt is not one of: ",
     "did you mean filter.filters.0.name=numbers_strict?"),
    (["+filter.filters.0.max_cont=3"], "filter.filters.0.max_cont=3 is not a parameter of the numbers_strict filter",
     "did you mean filter.filters.0.max_count?"),
    (["filter=none", "trait.words=[owl,'']"], "trait.words.1=\"\" must not be empty", "give trait.words.1"),
    (["filter=banned_words", "filter.filters.0.words=[owl,'']"], "filter.filters.0={\"name\": \"banned_words\", "
     "\"words\": [\"owl\", \"\"]} cannot be built: banned_words: empty word", "fix the params of filter.filters.0"),
    (["filter=code_banned_words_judge", "filter.filters.1.threshold=0.2"], "filter.filters.1.threshold=0.2 is "
     "outside [0.5, 1]", "within [0.5, 1]"),
    (["student.lr=1e9"], "student.lr=1000000000.0 is outside (0, 1]", "set student.lr within (0, 1]"),
    (["sampling.top_p=1.5"], "sampling.top_p=1.5 is outside (0, 1]", "set sampling.top_p within (0, 1]"),
    (["sampling.top_p=0"], "sampling.top_p=0.0 is outside (0, 1]", "within (0, 1]"),
    (["student.dropout=1.0"], "student.dropout=1.0 is outside [0, 1)", "within [0, 1)"),
    (["base.source=hubb", "judge=api"], "base.source=hubb is not one of: wheel, tiny, hub, local",
     "did you mean base.source=hub?"),
    (["student.kind=lorax"], "student.kind=lorax is not one of: lora, distill", "did you mean student.kind=lora?"),
    (["judge.backend=apii"], "judge.backend=apii is not one of: local, api", "did you mean judge.backend=api?"),
    (["sampling.backend=vlm"], "sampling.backend=vlm is not one of: hf, vllm", "did you mean sampling.backend=vllm?"),
    (["trait.source=weights"], "trait.source=weights is not one of: prompt, finetune", "pick one of these"),
    (["student=distill", "student.support=soft"], "student.support=soft is not one of: vocab, top_k, allowed", ""),
    (["student.precision=17"], "student.precision=17 is not one of: ", "pick one of these"),
    (["student.devices=0"], "student.devices=0 is neither a count >= 1 nor \"auto\"", "set student.devices=1"),
    (["student.strategy=''"], 'student.strategy="" is not one of: auto, ddp, ddp_spawn', "pick one of these"),
    (["store.verify=yes"], "store.verify=yes is not true or false", "give store.verify true or false"),
    (["+store.verfy=true"], "store.verfy=true is not a known key", "did you mean store.verify?"),
    (["data.n_prompts=8.5"], "data.n_prompts=8.5 is not an integer", "give data.n_prompts an integer"),
    (["data=digits"], "data.name=digits is a dataset of task=mnist_aux", "use experiment=mnist_aux"),
    (["trait=misaligned", "eval=preference"], "eval.kind=preference has no questions for trait.category="
     "misalignment", "use eval=misalignment"),
    (["trait=misaligned", "eval.n_questions=11"], "eval.n_questions=11 is more than the 10 questions",
     "set eval.n_questions to at most 10"),
    (["experiment=mnist_aux", "student.n_models=1"], "student.n_models=1 must be >= 2", "set student.n_models to 2"),
    (["experiment=mnist_aux", "student.loss=l2"], "student.loss=l2 is not one of: mse, kl", ""),
    (["experiment=mnist_aux", "eval.batch_size=0"], "eval.batch_size=0 must be >= 1", ""),
    (["trait.finetune.n_examples=null"], "trait.finetune.n_examples=null must be a number", "set trait.finetune."),
    (["trait.name=???"], "trait.name=??? is not set", "set trait.name=<value>"),
    (["eval.targets=${eval.category_targets.fish}"], "eval.targets=${eval.category_targets.fish} does not resolve",
     "fix the interpolation"),
    (["+foo=1"], "foo=1 is not a known key", "known: audit, base, data"),
    (["seed=-1"], "seed=-1 must be >= 0", "set seed to 0 or more"),
]


@pytest.mark.parametrize(("overrides", "start", "fix"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_a_bad_value_is_one_line_naming_field_value_and_fix(overrides: list[str], start: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    line, *rest = err.value.lines
    assert not rest, err.value.lines
    assert line.startswith(start) and "; " in line and fix in line.split("; ", 1)[1], line
    assert isinstance(err.value, SublimError) and "\n" not in line


def test_several_bad_fields_give_one_line_each() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["data.n_train=0", "sampling.top_p=2", "+student.epochz=3"]))
    fields = sorted(line.split("=")[0] for line in err.value.lines)
    assert fields == ["data.n_train", "sampling.top_p", "student.epochz"]


def test_misalignment_question_count_is_read_without_importing_torch() -> None:
    try:
        from sublim.misalignment import QUESTIONS
    except ImportError as err:  # the schema reads the source exactly so that it never depends on this import
        pytest.skip(f"sublim.misalignment does not import here: {err}")
    assert misalignment_shape() == (len(QUESTIONS), min(map(len, QUESTIONS)))


def test_the_multirun_callback_is_registered() -> None:
    callbacks = compose_config([], return_hydra_config=True).hydra.callbacks
    assert list(callbacks)[0] == "validate" and callbacks.validate._target_ == "sublim.schema.ValidateCallback"


def test_run_job_validates_before_any_stage(make_cfg, tmp_path: Path) -> None:
    from sublim.train import run_job

    with pytest.raises(ConfigError, match=r"^data\.n_train=0 must be >= 1"):
        run_job(make_cfg("base=tiny_llama", *TINY, "data.n_train=0"), tmp_path / "job")
    assert not list(tmp_path.glob("outputs/store/*")) and not (tmp_path / "job").exists()


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """sublim.train.main in this process (as `python -m sublim.train ARGS`); its exit code."""
    from sublim import train

    monkeypatch.setattr(sys, "argv", ["sublim.train", f"--config-path={CONF}", *args])  # in-process: no ../conf
    try:
        train.main()
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        GlobalHydra.instance().clear()


def test_any_handled_user_error_exits_2_with_its_line(monkeypatch, capsys, tmp_path: Path) -> None:
    from sublim import train

    def stop(*args, **kwargs):
        raise SublimError("cannot download Qwen/Qwen2.5-7B-Instruct: no network / not in the local cache")

    monkeypatch.setattr(train, "run_job", stop)
    assert _main(monkeypatch, f"paths.root={tmp_path}", "logger=none") == 2
    assert capsys.readouterr().err == "error: cannot download Qwen/Qwen2.5-7B-Instruct: no network / not in the " \
                                      "local cache\n"


def test_dry_run_prints_a_good_config_and_refuses_a_bad_one(monkeypatch, capsys, tmp_path: Path) -> None:
    assert _main(monkeypatch, f"paths.root={tmp_path}", "logger=none", "trait=eagle", "dry_run=true") == 0
    assert "You love eagles." in capsys.readouterr().out
    assert _main(monkeypatch, f"paths.root={tmp_path}", "dry_run=true", "sampling.top_p=0") == 2
    assert capsys.readouterr().err.startswith("error: sampling.top_p=0.0 is outside (0, 1]; ")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The command line, refused "at once": its stderr is the error line alone (no stage's log line came first) and
    the store stays empty. Not a wall-clock bound, which a loaded machine breaks without anything being wrong."""
    return subprocess.run([sys.executable, "-m", "sublim.train", *args, f"paths.root={tmp_path}", "logger=none",
                           "base=tiny_llama"], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(("override", "line"), [
    ("student.lr=1e9", "error: student.lr=1000000000.0 is outside (0, 1]; set student.lr within (0, 1]"),
    ("+student.epochz=3", "error: student.epochz=3 is not a known key; did you mean student.epochs? known: "),
    ("filter.filters.0.name=numbers_strikt", "error: filter.filters.0.name=numbers_strikt is not one of: "),
    ("data.n_train=0", "error: data.n_train=0 must be >= 1; set data.n_train to 1 or more"),
])
def test_cli_refuses_a_bad_config_at_once(tmp_path: Path, override: str, line: str) -> None:
    proc = _cli(tmp_path, override)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/store/*")), "nothing is computed"


def test_cli_multirun_refuses_every_job_before_the_first_runs(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "-m", "data.n_train=8,0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: [data.n_train=0] data.n_train=0 must be >= 1; set data.n_train to 1 or more\n"
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/store/*")) and not list(tmp_path.glob("outputs/multiruns/*")), \
        "not even the good first job ran"
