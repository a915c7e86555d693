"""The method registry: every editing method, SCEN included, behind one interface (`Method`).

Each module of this package defines and registers its methods (`register`); the pipeline asks a
method what it needs and what it produces, never its name. Adding a method is one module here plus
its presets (docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import importlib
import pkgutil

from engramflow.editors.methods.base import Method, StatisticsSpec, Stats

METHODS: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method to the registry under its name (a module calls this at import)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def load_all() -> dict[str, Method]:
    """Import every method module of this package once; the registry, name -> method."""
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True
    return METHODS


def get_method(name: str) -> Method:
    """The registered method `name` (ValueError naming the known ones otherwise)."""
    methods = load_all()
    try:
        return methods[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}") from None


__all__ = ["METHODS", "Method", "StatisticsSpec", "Stats", "get_method", "load_all", "register"]
