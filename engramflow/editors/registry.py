"""A registry of named things defined one module each in a package (methods, evaluation protocols):
each module registers what it defines at import, and the registry imports every module on first use."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> item, filled by the modules of `package` (all imported by `load_all`)."""

    def __init__(self, package: str, kind: str, skip: tuple[str, ...] = ()) -> None:
        self.package, self.kind, self.skip = package, kind, skip
        self.items: dict[str, T] = {}
        self._loaded = False

    def register(self, item: T) -> T:
        """Add `item` under its `name` (a module calls this at import)."""
        name = item.name  # type: ignore[attr-defined]
        if name in self.items and self.items[name] is not item:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self.items[name] = item
        return item

    def load_all(self) -> dict[str, T]:
        """Import every module of the package once; name -> item."""
        if not self._loaded:
            path = importlib.import_module(self.package).__path__
            for info in pkgutil.iter_modules(path):
                if info.name not in self.skip:
                    importlib.import_module(f"{self.package}.{info.name}")
            self._loaded = True
        return self.items

    def get(self, name: str) -> T:
        """The item named `name` (ValueError naming the known ones otherwise)."""
        items = self.load_all()
        try:
            return items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(items))}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.load_all())
