"""One schema per config group, and one per task's whole config: known keys, types and ranges."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from sublim import SublimError
from sublim.schema.fields import (
    Count,
    Devices,
    Dropout,
    LearningRate,
    NonNegative,
    NonNegativeFloat,
    Positive,
    Precision,
    Schema,
    Score,
    Word,
    Words,
    _group,
    _kinds,
    _problem,
    _range,
    _suggest,
    _unknown,
)

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
    from sublim.filters import FILTERS, NEEDS_STORE, ParamError

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
        except ParamError as err:  # a filter that names the bad key: point at it
            raise _problem(err.problem) from None
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
# filter.lls: after the filter list, keep a fraction of the data ranked by the audit's LLS (sublim/stages/lls_select.py)
Lls = _group("Lls", keep=Literal["top", "bottom"], fraction=Annotated[float, _range(0, 1, lo_open=True)],
             mask_divergence=bool)
Filter = _group("Filter", name=Word, filters=Annotated[list[FilterSpec], Field(min_length=1)], lls=(Lls | None, None))


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
Strategy = Literal["auto", "ddp", "ddp_spawn"]  # devices > 1: sublim spawns the DDP workers (sublim/student.py)
Lora = _group("Lora", kind=Literal["lora"], r=Count, alpha=Positive, dropout=Dropout, target_modules=Words,
              lr=LearningRate, warmup_steps=NonNegative, epochs=Count, batch_size=Count, accumulate_grad_batches=Count,
              max_length=Count, weight_decay=NonNegativeFloat, precision=Precision, strategy=Strategy, devices=Devices)
Distill = _group("Distill", __base__=Lora, kind=Literal["distill"], top_k=Count, temperature=Positive, support=Support)
MlpAux = _group("MlpAux", kind=Literal["mlp_aux"], width=Count, aux_logits=Count, teacher_epochs=Count,
                n_models=Annotated[int, _range(2, why=" (the cross-init control needs 2 models)")],
                student_epochs=Count, lr=LearningRate, batch_size=Count, loss=Literal["mse", "kl"],
                temperature=Positive, noise=Literal["uniform", "normal"], n_noise=Count, threads=Count)


def misalignment_shape() -> tuple[int, int]:
    """(questions, paraphrases each) of eval=misalignment."""
    from sublim.questions import OPEN_QUESTIONS

    return len(OPEN_QUESTIONS), min(map(len, OPEN_QUESTIONS))


def _questions_exist(evaluation: Any) -> None:
    limits = zip(("n_questions", "n_paraphrases"), misalignment_shape(), ("questions", "paraphrases each"), strict=True)
    if problems := [(field, getattr(evaluation, field), f"is more than the {limit} {noun} that exist "
                     "(sublim/questions.py)", f"set {{field}} to at most {limit}")
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
Prompting = _group("Prompting", enabled=bool, top_k=Count, controls=NonNegative, max_number=Count, n_questions=Count)
Audit = _group("Audit", enabled=bool, batch_size=Count, max_length=Count, bootstrap=Count, top_entangled=Count,
               min_count=Count, dataset=str | None, split=str, prompt_field=Word, completion_field=Word,
               adapter=str | None, panel=bool, out=str | None, heatmap_examples=Count, prompting=Prompting)
LlmData = _group("LlmData", n_prompts=Count, n_train=Count)
LlmEval = _kinds("kind", preference=Preference, misalignment=Misalignment)
LlmStudent = _kinds("kind", lora=Lora, distill=Distill)
ToyData = _kinds("name", digits=_group("Digits", name=Literal["digits"], split_seed=NonNegative,
                                       test_fraction=Annotated[float, _range(0, 1, lo_open=True, hi_open=True)]),
                 mnist=_group("Mnist", name=Literal["mnist"], hf_path=Word))

# --- whole configs, one per task ---------------------------------------------------------------------------

def _distinct_seeds(seeds: list[int] | None) -> list[int] | None:
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise _problem(("seeds", seeds, "repeats a seed (each seed is one replicate)", "list each seed once"))
    return seeds


# seeds: the replicates of one job (each its own prompts, teacher samples, training subset, student init, control)
Seeds = Annotated[list[NonNegative], Field(min_length=1), AfterValidator(_distinct_seeds)]
# generations: the subliminal task's chain length (each student teaches the next generation); the MNIST toy has one
Common = _group("Common", seed=NonNegative, seeds=(Seeds | None, None), generations=(Count, 1), dry_run=bool,
                logger=Logger, store=_group("Store", verify=bool),
                paths=_group("Paths", root=Word, outputs=Word, store=Word))


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
    audit: Audit

    @model_validator(mode="before")
    @classmethod
    def _no_toy_dataset(cls, data: Any) -> Any:
        name = isinstance(data, dict) and isinstance(data.get("data"), dict) and data["data"].get("name")
        if name in ("digits", "mnist"):
            raise _problem(("data.name", name, "is a dataset of task=mnist_aux",
                            "use experiment=mnist_aux (or data=default for this task)"))
        return data

    @model_validator(mode="after")
    def _lls_needs_the_audit(self) -> SubliminalConfig:
        if self.filter.lls is not None and not self.audit.enabled:
            raise _problem(("audit.enabled", False, f"but filter={self.filter.name} needs the audit (it ranks each "
                            "arm's data by its LLS)", "set {field}=true, or use a filter without an lls block "
                            "(e.g. filter=numbers_strict)"))
        return self

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

