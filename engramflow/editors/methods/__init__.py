"""The method registry: every editing method, SCEN included, behind one interface (`Method`).

Each module of this package defines and registers its methods (`register`); the pipeline asks a
method what it needs and what it produces, never its name. Adding a method is one module here plus
its presets (docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

from engramflow.editors.methods.base import Method, StatisticsSpec, Stats
from engramflow.editors.registry import Registry

_REGISTRY: Registry[Method] = Registry(__name__, "method", skip=("base",))
METHODS = _REGISTRY.items  # name -> method (complete once load_all has run)
register = _REGISTRY.register
load_all = _REGISTRY.load_all
get_method = _REGISTRY.get

__all__ = ["METHODS", "Method", "StatisticsSpec", "Stats", "get_method", "load_all", "register"]
