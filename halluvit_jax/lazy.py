"""Package names imported on first use (PEP 562), for the packages whose ``__init__`` would
otherwise pull heavy optional stacks into every import of one of their modules (``train``,
``data``: grain and TFDS)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose name ``N`` lives in its module
    ``exports[N]``: the module is imported when ``N`` is first read, and ``N`` cached on the
    package."""
    names = sorted(exports)

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__, names
