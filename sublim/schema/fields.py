"""The building blocks of the config schemas: ranged types, the strict base model, one-line problems."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from sublim import SublimError


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


