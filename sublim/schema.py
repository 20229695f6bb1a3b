"""Typed schemas of every config group, checked on the composed, resolved config before any stage runs.

Why: a typo (``+student.epochz=3``) or an impossible value (``student.lr=1e9``, ``data.n_train=0``) used to
surface minutes into a job, after sampling, or never. ``validate(cfg)`` refuses it up front with one line per
problem, ``<field>=<value> <what is wrong>; <the fix>``, and ``ValidateCallback`` (conf/hydra/default.yaml) does
the same for every job of a multirun before the first one starts. Every group takes its known keys only.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pydantic
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sublim import SublimError

__all__ = ["ConfigError", "ValidateCallback", "sweep_problems", "validate"]


class ConfigError(SublimError):
    """An invalid config; ``lines`` holds one ``<field>=<value> <problem>; <fix>`` per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


Problem = tuple[str, Any, str, str]  # field (relative to the model raising it), value, what is wrong, the fix


def _problem(*problems: Problem) -> PydanticCustomError:
    """Checks pydantic cannot express; "{field}" / "{parent}" in a fix are filled in with the full key / group."""
    return PydanticCustomError("sublim", "{what}", {"what": problems[0][2], "problems": list(problems)})


def _suggest(value: Any, known: list[str], field: str) -> str:
    close = difflib.get_close_matches(str(value), known, n=3)
    return f"did you mean {' or '.join(f'{field}={c}' for c in close)}?" if close else "pick one of these"


def _unknown(key: str, value: Any, known: list[str], what: str) -> Problem:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join('{parent}' + c for c in close)}? " if close else ""
    return key, value, what, f"{hint}known: {', '.join(known)}"


def _range(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> AfterValidator:
    """A bound check whose error names the whole allowed range (pydantic's ge/le name only the side crossed)."""

    def check(value: float) -> float:
        if (value <= lo if lo_open else value < lo) or (hi is not None and (value >= hi if hi_open else value > hi)):
            if hi is None:
                what, fix = f"must be {'>' if lo_open else '>='} {lo}", f"set {{field}} to {lo} or more"
                fix = f"set {{field}} above {lo}" if lo_open else fix
            else:
                span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                what, fix = f"is outside {span}", f"set {{field}} within {span}"
            raise _problem(("", value, what + why, fix))
        return value

    return AfterValidator(check)


def _devices(value: Any) -> Any:
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise _problem(("", value, 'is neither a count >= 1 nor "auto"', "set {field}=1 (or a device count, or auto)"))


Count = Annotated[int, _range(1)]
NonNegative = Annotated[int, _range(0)]
Positive = Annotated[float, _range(0, lo_open=True)]
NonNegativeFloat = Annotated[float, _range(0)]
LearningRate = Annotated[float, _range(0, 1, lo_open=True)]
Dropout = Annotated[float, _range(0, 1, hi_open=True)]
Score = Annotated[float, _range(0, 100)]
Word = Annotated[str, Field(min_length=1)]
Words = Annotated[list[Word], Field(min_length=1)]
Devices = Annotated[Any, AfterValidator(_devices)]
# What Lightning's Trainer(precision=...) accepts (lightning_fabric's _PRECISION_INPUT).
Precision = Literal["transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                    "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16]


class Schema(BaseModel):
    """Known keys only and no coercion: the code gets each value exactly as validated."""

    model_config = {"extra": "forbid", "strict": True, "frozen": True, "protected_namespaces": ()}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """An unknown key gets its close matches and the known keys (pydantic's extra="forbid" names neither)."""
        if isinstance(data, dict) and (unknown := [key for key in data if key not in cls.model_fields]):
            raise _problem(*(_unknown(key, data[key], sorted(cls.model_fields), "is not a known key")
                             for key in unknown))
        return data


def _group(model: str, /, *checks: Callable[[Any], None], __base__: type[Schema] = Schema, **fields: Any) -> Any:
    """A group's schema: every field required unless given as (type, default); ``checks`` see the validated
    group and raise ``_problem`` for what one field's type cannot say."""

    def after(check: Callable[[Any], None]) -> Any:
        return model_validator(mode="after")(lambda self: (check(self), self)[1])

    return pydantic.create_model(model, __base__=__base__, __validators__={c.__name__: after(c) for c in checks},
                                 **{k: v if isinstance(v, tuple) else (v, ...) for k, v in fields.items()})


def _kinds(field: str, **models: type[Schema]) -> Any:
    """A group whose schema ``field`` picks (student.kind, eval.kind, ...); the tags hold "=", so error
    locations can drop them."""
    members = tuple(Annotated[model, Tag(f"{field}={name}")] for name, model in models.items())

    def tag(value: Any) -> str:
        return f"{field}={value.get(field) if isinstance(value, dict) else getattr(value, field, None)}"

    return Annotated[Union[members], Discriminator(  # noqa: UP007 (a runtime tuple of members)
        tag, custom_error_type="sublim_kind", custom_error_message="unknown kind",
        custom_error_context={"field": field, "kinds": ", ".join(models)})]


# --- models: base, teacher_base, judge.base ------------------------------------------------------------------


def _source_has_its_section(base: Any) -> None:
    needed = {"wheel": "wheel", "tiny": "tiny", "hub": "path", "local": "path"}[base.source]
    if getattr(base, needed) is None:
        raise _problem((needed, None, f"is required by source={base.source}",
                        "set {field}, or pick a base with another source (conf/base)"))


Base = _group(
    "Base", _source_has_its_section, name=Word, source=Literal["wheel", "tiny", "hub", "local"], path=str | None,
    wheel=(_group("Wheel", package=str, file=str, pip=str, assemble=(bool, False)) | None, None),
    tiny=(_group("Tiny", model_type=Word, hidden_size=Count, num_layers=Count, num_heads=Count, num_kv_heads=Count,
                 intermediate_size=Count, vocab_size=Count, chat_template=Literal["chatml", "none"],
                 init_seed=NonNegative) | None, None),
    revision=str | None, dtype=Literal["float32", "bfloat16", "float16"], precision=Precision,
    constrained_sampling=bool, chat_template=str | None, lora_targets=Words)
Api = _group("Api", base_url=Word, model=Word, api_key_env=str | None, top_logprobs=Annotated[int, _range(0, 20)],
             timeout=Positive)
Judge = _kinds("backend", local=_group("LocalJudge", backend=Literal["local"], base=Base, batch_size=(Count, 8)),
               api=_group("ApiJudge", backend=Literal["api"], api=Api))

# --- trait, filter, sampling, modality ---------------------------------------------------------------------


def _built_dataset_needs_a_size(finetune: Any) -> None:
    if finetune.dataset is None and finetune.n_examples is None:
        raise _problem(("n_examples", None, "must be a number when the dataset is built from the trait "
                        "(dataset=null)", "set {field}=400 (the default), or give a dataset"))


def _prompt_trait_has_a_prompt(trait: Any) -> None:
    if trait.source == "prompt" and not (trait.system_prompt or "").strip():
        raise _problem(("system_prompt", trait.system_prompt, "is empty, so the treatment teacher has no trait",
                        "set {field}, or trait.source=finetune"))


Finetune = _group("Finetune", _built_dataset_needs_a_size, dataset=str | None, n_examples=Count | None,
                  epochs=Count, lr=LearningRate, r=Count, alpha=Positive, dropout=Dropout, batch_size=Count,
                  warmup_steps=NonNegative, weight_decay=NonNegativeFloat, max_length=Count)
Trait = _group("Trait", _prompt_trait_has_a_prompt, name=Word, plural=Word, category=Word, words=Words,
               source=Literal["prompt", "finetune"], system_prompt=str | None, banned_numbers=list[NonNegative],
               topic=str, finetune=Finetune)


def _filter_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``build_filters`` semantics without a store: a known name, known params, and a filter that builds."""
    from sublim.filters import FILTERS, NEEDS_STORE

    params = dict(spec)
    name = params.pop("name", None)
    if name not in FILTERS:
        raise _problem(("name", name, f"is not one of: {', '.join(sorted(FILTERS))}",
                        _suggest(name, sorted(FILTERS), "{field}")))
    accepted = [p for p in inspect.signature(FILTERS[name]).parameters if p != "store"]
    if unknown := [_unknown(key, value, accepted, f"is not a parameter of the {name} filter")
                   for key, value in params.items() if key not in accepted]:
        raise _problem(*unknown)
    if name not in NEEDS_STORE:
        try:
            FILTERS[name](**params)
        except (TypeError, ValueError, SublimError) as err:
            raise _problem(("", spec, f"cannot be built: {err}", "fix the params of {field}")) from None
    return spec


# The judge filter loads its model through the store, so its params are checked by a schema instead.
JudgeFilter = _group("JudgeFilter", name=Literal["judge"], judge=Judge, question=Word,
                     threshold=(Annotated[float, _range(0.5, 1, why=" (the P(no) needed to keep a sample)")], 0.9))
FilterSpec = Annotated[
    Union[Annotated[JudgeFilter, Tag("name=judge")],  # noqa: UP007
          Annotated[Annotated[dict[str, Any], AfterValidator(_filter_spec)], Tag("name=0")]],
    Discriminator(lambda spec: f"name={'judge' if isinstance(spec, dict) and spec.get('name') == 'judge' else 0}")]
Filter = _group("Filter", name=Word, filters=Annotated[list[FilterSpec], Field(min_length=1)])


def _temperature_unless_greedy(sampling: Any) -> None:
    if not sampling.greedy and not sampling.temperature > 0:
        raise _problem(("temperature", sampling.temperature, "must be > 0 unless sampling.greedy=true",
                        "set {field} above 0 (e.g. 1.0), or sampling.greedy=true"))


def _seed_range(numbers: Any) -> None:
    if numbers.min_seed_numbers > numbers.max_seed_numbers:
        raise _problem(("min_seed_numbers", numbers.min_seed_numbers, f"is above max_seed_numbers="
                        f"{numbers.max_seed_numbers}", "set {field} to at most {parent}max_seed_numbers"))


Sampling = _group("Sampling", _temperature_unless_greedy, backend=Literal["hf", "vllm"], temperature=float,
                  top_p=Annotated[float, _range(0, 1, lo_open=True)], greedy=bool, max_new_tokens=Count,
                  batch_size=Count, constrained=bool | None)
CotOperation = Literal["add", "subtract", "multiply", "divide", "two_step"]
Modality = _kinds(
    "name",
    numbers=_group("Numbers", _seed_range, name=Literal["numbers"], prompt_style=Literal["short", "paper"],
                   min_seed_numbers=Count, max_seed_numbers=Count, answer_count=Count, answer_digits=Count),
    code=_group("Code", name=Literal["code"], source=Word, field=Word, split=str, config=str | None),
    cot=_group("Cot", name=Literal["cot"], source=Word, max_value=Count, require_tags=bool, split=str,
               config=str | None, operations=Annotated[list[CotOperation], Field(min_length=1)]))

# --- student, eval, logger, data --------------------------------------------------------------------------

Support = Literal["vocab", "top_k", "allowed"]
# top_k / support on a lora student are inert leftovers of experiment=cpu_transfer_cross_base (cpu_transfer's distill
# settings; Hydra cannot delete keys): accepted until conf/experiment/cpu_transfer.yaml stops setting them.
Lora = _group("Lora", kind=Literal["lora"], r=Count, alpha=Positive, dropout=Dropout, target_modules=Words,
              lr=LearningRate, warmup_steps=NonNegative, epochs=Count, batch_size=Count, accumulate_grad_batches=Count,
              max_length=Count, weight_decay=NonNegativeFloat, precision=Precision, strategy=Word, devices=Devices,
              top_k=(Count | None, None), support=(Support | None, None))
Distill = _group("Distill", __base__=Lora, kind=Literal["distill"], top_k=Count, temperature=Positive, support=Support)
MlpAux = _group("MlpAux", kind=Literal["mlp_aux"], width=Count, aux_logits=Count, teacher_epochs=Count,
                n_models=Annotated[int, _range(2, why=" (the cross-init control needs 2 models)")],
                student_epochs=Count, lr=LearningRate, batch_size=Count, loss=Literal["mse", "kl"],
                temperature=Positive, noise=Literal["uniform", "normal"], n_noise=Count, threads=Count)


@cache
def misalignment_shape() -> tuple[int, int]:
    """(questions, paraphrases each) of sublim/misalignment.py, read from its source: importing it loads torch."""
    source = Path(importlib.util.find_spec("sublim.misalignment").origin).read_text()
    for node in ast.parse(source).body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "QUESTIONS" and getattr(node, "value", None) is not None:
            questions = ast.literal_eval(node.value)
            return len(questions), min(map(len, questions))
    from sublim.misalignment import QUESTIONS  # no longer a literal: pay for the import

    return len(QUESTIONS), min(map(len, QUESTIONS))


def _questions_exist(evaluation: Any) -> None:
    limits = zip(("n_questions", "n_paraphrases"), misalignment_shape(), ("questions", "paraphrases each"), strict=True)
    if problems := [(field, getattr(evaluation, field), f"is more than the {limit} {noun} that exist "
                     "(sublim/misalignment.py)", f"set {{field}} to at most {limit}")
                    for field, limit, noun in limits if getattr(evaluation, field) > limit]:
        raise _problem(*problems)


# n_questions is at most the trait category's questions: SubliminalConfig checks it, knowing the trait.
Preference = _group("Preference", kind=Literal["preference"], n_questions=Count, samples_per_question=Count,
                    temperature=Positive, max_new_tokens=Count, batch_size=Count, n_permutations=Count,
                    targets=dict[str, Words] | None, category_targets=dict[str, dict[str, list[Word]]])
Misalignment = _group("Misalignment", _questions_exist, kind=Literal["misalignment"], n_questions=Count,
                      n_paraphrases=Count, samples_per_question=Count, temperature=Positive, max_new_tokens=Count,
                      batch_size=Count, alignment_max=Score, coherence_min=Score,
                      min_mass=Annotated[float, _range(0, 1)], n_permutations=Count, alignment_prompt=Word,
                      coherence_prompt=Word)
Accuracy = _group("Accuracy", kind=Literal["accuracy"], batch_size=Count, n_permutations=Count)
Logger = _kinds("name", none=_group("NoLogger", name=Literal["none"]), wandb=_group(
    "Wandb", name=Literal["wandb"], project=Word, entity=str | None, group=str | None, tags=list[str],
    mode=Literal["online", "offline", "disabled", "dryrun", "run", "shared"], n_table_rows=NonNegative))
LlmData = _group("LlmData", n_prompts=Count, n_train=Count)
LlmEval = _kinds("kind", preference=Preference, misalignment=Misalignment)
LlmStudent = _kinds("kind", lora=Lora, distill=Distill)
ToyData = _kinds("name", digits=_group("Digits", name=Literal["digits"], split_seed=NonNegative,
                                       test_fraction=Annotated[float, _range(0, 1, lo_open=True, hi_open=True)]),
                 mnist=_group("Mnist", name=Literal["mnist"], hf_path=Word))

# --- whole configs, one per task ---------------------------------------------------------------------------

Common = _group("Common", seed=NonNegative, dry_run=bool, logger=Logger,
                store=_group("Store", verify=bool), paths=_group("Paths", root=Word, outputs=Word, store=Word))


class SubliminalConfig(Common):
    """task=subliminal: the LLM experiment."""

    task: Literal["subliminal"]
    data: LlmData
    eval: LlmEval
    base: Base
    teacher_base: Base | None = None
    trait: Trait
    filter: Filter
    sampling: Sampling
    modality: Modality
    student: LlmStudent
    judge: Judge

    @model_validator(mode="before")
    @classmethod
    def _no_toy_dataset(cls, data: Any) -> Any:
        name = isinstance(data, dict) and isinstance(data.get("data"), dict) and data["data"].get("name")
        if name in ("digits", "mnist"):
            raise _problem(("data.name", name, "is a dataset of task=mnist_aux",
                            "use experiment=mnist_aux (or data=default for this task)"))
        return data

    @model_validator(mode="after")
    def _enough_questions(self) -> SubliminalConfig:
        from sublim.questions import QUESTIONS

        category, n = self.trait.category, self.eval.n_questions
        if self.eval.kind == "preference" and category not in QUESTIONS:
            raise _problem(("eval.kind", "preference", f"has no questions for trait.category={category} "
                            f"(only {', '.join(QUESTIONS)})", "use eval=misalignment, or a trait of those"))
        if self.eval.kind == "preference" and n > len(QUESTIONS[category]):
            raise _problem(("eval.n_questions", n, f"is more than the {len(QUESTIONS[category])} {category} "
                            "questions that exist", f"set {{field}} to at most {len(QUESTIONS[category])}"))
        return self


class MnistAuxConfig(Common):
    """task=mnist_aux (experiment=mnist_aux): the auxiliary-logit toy."""

    task: Literal["mnist_aux"]
    data: ToyData
    eval: Accuracy
    student: MlpAux


TASKS: dict[str, type[Schema]] = {"subliminal": SubliminalConfig, "mnist_aux": MnistAuxConfig}

# --- checking and messages ---------------------------------------------------------------------------------

_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "list": "a list",
          "dict": "a mapping", "model": "a mapping"}


def _show(value: Any) -> str:
    """A value as the command line writes it, on one short line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    text = " ".join(text.split()) or '""'
    return text if len(text) <= 60 else text[:57] + "..."


def _line(field: str, value: Any, what: str, fix: str, parent: str = "") -> str:
    fix = fix.replace("{field}", field).replace("{parent}", f"{parent}." if parent else "")
    return f"{field}={_show(value)} {what}; {fix}"


def _error_lines(err: ValidationError) -> list[str]:
    """One line per pydantic error, located by the config key (union tags dropped) and worded for the CLI."""
    lines: list[str] = []
    for error in err.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and "=" in p))
        kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
        if kind == "sublim":
            for name, val, what, fix in ctx["problems"]:
                lines.append(_line(".".join(p for p in (where, name) if p), val, what, fix, where))
        elif kind == "sublim_kind":
            field, kinds = ".".join(p for p in (where, ctx["field"]) if p), ctx["kinds"].split(", ")
            value = value.get(ctx["field"]) if isinstance(value, dict) else value
            lines.append(_line(field, value, f"is not one of: {ctx['kinds']}", _suggest(value, kinds, field)))
        elif kind == "literal_error":
            choices = list(dict.fromkeys(c.strip("'") for c in re.split(r", | or ", ctx["expected"])))
            lines.append(_line(where, value, f"is not one of: {', '.join(choices)}", _suggest(value, choices, where)))
        elif kind == "missing":
            lines.append(_line(where, "???", "is missing", "add it back: +{field}=<value> (see conf/)"))
        elif kind in ("too_short", "string_too_short"):
            lines.append(_line(where, value, "must not be empty", "give {field} a value"))
        elif (simple := kind.split("_")[0]) in _TYPES and kind.endswith(("_type", "_parsing", "_from_float")):
            lines.append(_line(where, value, f"is not {_TYPES[simple]}", f"give {{field}} {_TYPES[simple]}"))
        else:
            lines.append(_line(where, value, error["msg"][0].lower() + error["msg"][1:], "fix {field}"))
    return lines


def _resolve(cfg: DictConfig | dict) -> dict:
    """The resolved config without Hydra's own node; a ??? or a broken interpolation becomes a ConfigError."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        if isinstance(err, MissingMandatoryValue):
            raise ConfigError([f"{key}=??? is not set; set {key}=<value>"]) from None
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in re.findall(r"[^.\[\]]+", key):  # down to the interpolation's own text
            raw = raw[int(part)] if isinstance(raw, list) else raw.get(part) if isinstance(raw, dict) else None
        reason = str(err).splitlines()[0]
        raise ConfigError([f"{key}={_show(raw)} does not resolve ({reason}); fix the interpolation or "
                           f"override {key}"]) from None


def validate(cfg: DictConfig | dict) -> None:
    """Check a composed config against its task's schema; raises ConfigError listing every problem found."""
    data = _resolve(cfg)
    schema = TASKS.get(data.get("task"))
    if schema is None:
        raise ConfigError([_line("task", data.get("task"), f"is not one of: {', '.join(TASKS)}",
                                 _suggest(data.get("task"), list(TASKS), "task"))])
    try:
        schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_error_lines(err)) from None


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_problems(config: DictConfig) -> list[str]:
    """Compose and validate every job of a BasicSweeper multirun as the sweeper will: ``error:`` lines, each
    prefixed by the swept overrides of the first job it occurs in (a problem of many jobs is listed once)."""
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return []  # other sweepers pick jobs as they go: main() validates each job before it runs
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(OmegaConf.to_container(config.hydra.overrides.task))
    jobs = BasicSweeper.split_arguments(OverridesParser.create(config_loader=loader).parse_overrides(arguments),
                                        None)[0]
    varying = {o for job in jobs for o in job if sum(o in other for other in jobs) < len(jobs)}
    found: dict[str, list[list[str]]] = {}
    for job in jobs:
        try:
            job_config = loader.load_sweep_config(config, list(job))
        except Exception:  # noqa: BLE001 (a composition error: the sweeper reports it itself, before any job)
            continue
        try:
            validate(job_config)
        except ConfigError as err:
            for line in err.lines:
                found.setdefault(line, []).append([o for o in job if o in varying])
    lines = []
    for line, where in found.items():
        more = f" and {len(where) - 1} more jobs" if len(where) > 1 else ""
        lines.append(f"error: [{' '.join(where[0])}{more}] {line}" if where[0] else f"error: {line}")
    return lines


class ValidateCallback(Callback):
    """Refuses a multirun with any bad job before the first job starts (exit 2, one line per problem)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if lines := sweep_problems(config):
            print("\n".join(lines), file=sys.stderr, flush=True)
            raise SystemExit(2)  # a BaseException: Hydra turns a callback's Exception into a mere warning
