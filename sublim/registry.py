"""Registries of kinds (eval, student, modality, sampling backend): a new kind is one module plus one yaml.

A registry owns a package; every module in it registers its kind on import, and the registry imports
the package's modules the first time it is asked for a name, so no list of kinds is kept by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sublim import SublimError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> kind, filled by ``register`` in the modules of ``package``."""

    def __init__(self, field: str, package: str | None = None) -> None:
        self.field = field  # the config field that chooses a kind, for error messages
        self.package = package
        self._kinds: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def add(kind: T) -> T:
            if name in self._kinds and self._kinds[name] is not kind:
                raise ValueError(f"{self.field}={name} is registered twice")
            self._kinds[name] = kind
            return kind

        return add

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._kinds)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._kinds

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        self._discover()
        if name not in self._kinds:
            raise SublimError(f"{self.field}={name} is not one of: {', '.join(self.names())}")
        return self._kinds[name]
