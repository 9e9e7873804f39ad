"""The one place that knows there are two HTTP packages: httpx and httpx2.

httpx2 is httpx's maintained continuation, with the same API under another
name (and httpcore2 under it); an ``httpx2.AsyncClient`` only takes
``httpx2`` transports, raises ``httpx2`` exceptions and reads ``httpx2``
streams. The layers are written once, against ``httpx``. For httpx2, the
modules that touch HTTP objects are loaded a second time from the same
files, as ``resilient_http._httpx2.<module>``, with their own builtins in
which ``import httpx`` means ``httpx2`` and ``import httpcore`` means
``httpcore2``. Nothing else in the process changes: ``sys.modules["httpx"]``
is never touched (``httpx2.alias_httpx()`` is for applications, not
libraries), so an application may use both packages side by side.

Modules that never touch HTTP objects (:data:`SHARED`: policies, the clock,
host patterns, TOML loading, the fleet's store, ``ConfigurationError``) are
not loaded twice: one ``Policy`` serves both flavours, a policy file is read
once, and one store object may be given to transports of either flavour.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

PACKAGE = __name__.rpartition(".")[0]  # "resilient_http"
CLONE = f"{PACKAGE}._httpx2"

#: Modules of the package that do not import httpx, directly or through another module, and are shared.
SHARED = frozenset(
    {"_checks", "_clock", "_config", "_errors", "_events", "_flavours", "_hosts", "_series", "_toml", "events", "store"}
)

#: What the modules of the httpx2 flavour import instead.
RENAMES = {"httpx": "httpx2", "httpcore": "httpcore2"}


def _renamed(name: str) -> str:
    top, dot, rest = name.partition(".")
    new = RENAMES.get(top)
    return name if new is None else new + dot + rest


def _original(name: str) -> str:
    """``resilient_http._httpx2.x.y`` → ``resilient_http.x.y``."""
    return PACKAGE + name[len(CLONE) :]


def _is_shared(original: str) -> bool:
    return original[len(PACKAGE) + 1 :].split(".", 1)[0] in SHARED


def _import(
    name: str,
    globals: Mapping[str, Any] | None = None,
    locals: Mapping[str, Any] | None = None,
    fromlist: Sequence[str] = (),
    level: int = 0,
) -> ModuleType:
    """``__import__`` for the httpx2 flavour's modules."""
    if level == 0:
        name = _renamed(name)
        if name.startswith(PACKAGE + ".") and not name.startswith(CLONE) and not _is_shared(name):
            name = CLONE + name[len(PACKAGE) :]
    else:
        package = (globals or {}).get("__package__") or ""
        target = importlib.util.resolve_name("." * level + name, package) if name else package
        if level and name and target.startswith(CLONE) and _is_shared(_original(target)):
            # A shared module: the one everybody uses, not a second copy.
            module = builtins.__import__(_original(target), None, None, fromlist or ("_",), 0)
            return module if fromlist else sys.modules[_original(target)]
    return builtins.__import__(name, globals, locals, fromlist, level)


_BUILTINS = {**builtins.__dict__, "__import__": _import}


class _Loader(importlib.abc.Loader):
    """Runs a module's own code with the httpx2 flavour's builtins."""

    def __init__(self, original: importlib.machinery.ModuleSpec) -> None:
        self._original = original

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        loader = self._original.loader
        assert isinstance(loader, importlib.machinery.SourceFileLoader)
        code = loader.get_code(self._original.name)
        assert code is not None
        module.__dict__["__builtins__"] = _BUILTINS
        exec(code, module.__dict__)


class _Shared(importlib.abc.Loader):
    """Gives the shared module itself under its httpx2-flavour name (``from resilient_http._httpx2 import _config``)."""

    def __init__(self, original: str) -> None:
        self._original = original

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return importlib.import_module(self._original)

    def exec_module(self, module: ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``resilient_http._httpx2.*``: the same files as ``resilient_http.*``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != CLONE and not fullname.startswith(CLONE + "."):
            return None
        if fullname != CLONE and _is_shared(_original(fullname)):
            return importlib.machinery.ModuleSpec(fullname, _Shared(_original(fullname)))
        original = importlib.util.find_spec(PACKAGE if fullname == CLONE else _original(fullname))
        if original is None or original.origin is None:
            return None
        spec = importlib.util.spec_from_file_location(
            fullname,
            original.origin,
            loader=_Loader(original),
            submodule_search_locations=original.submodule_search_locations,
        )
        return spec


_FINDER = _Finder()


def load(module: str = "") -> ModuleType:
    """The httpx2 flavour of ``resilient_http`` (or of one of its modules, ``"layers.retry"``)."""
    import httpx2  # noqa: F401  (a clear ImportError when httpx2 is not installed)

    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)  # before the path finder, which would find the same files
    name = CLONE + ("." + module if module else "")
    return importlib.import_module(name)
