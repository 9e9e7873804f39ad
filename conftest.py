"""With ``RESILIENT_HTTP_FLAVOUR=httpx2``, the whole suite runs against httpx2.

Before any test module is imported, ``httpx`` (and ``httpcore``) are made
to mean httpx2 (httpcore2) in this test process, and every module of
``resilient_http`` its httpx2 flavour: the tests, written against httpx,
then drive ``resilient_http.httpx2`` through ``httpx2.AsyncClient``. This
aliasing is for the test process only; the library itself never aliases
(see ``resilient_http/_flavours.py``).
"""

from __future__ import annotations

import os

collect_ignore: list[str] = []

if os.environ.get("RESILIENT_HTTP_FLAVOUR") == "httpx2":
    import importlib
    import pkgutil
    import sys

    import httpcore2
    import httpx2

    import resilient_http
    from resilient_http import _flavours

    clone = _flavours.load()
    prefix = _flavours.PACKAGE + "."
    names = [
        info.name[len(prefix) :]
        for info in pkgutil.walk_packages(resilient_http.__path__, prefix)
        if not info.name.endswith("__main__")
    ]
    # Shared modules stay the originals, as the clone's own imports have them: a
    # second _flavours would name its package "resilient_http._httpx2" and break
    # ``import resilient_http.httpx2``.
    cloned = [name for name in names if name != "httpx2" and name.split(".")[0] not in _flavours.SHARED]
    modules = {"": clone, **{name: _flavours.load(name) for name in cloned}}
    # A shared package is the original under the clone too (``import resilient_http.store``).
    for name in {name.split(".")[0] for name in names if "." in name} & _flavours.SHARED:
        setattr(clone, name, importlib.import_module(prefix + name))
    sys.modules["httpx"] = httpx2
    sys.modules["httpcore"] = httpcore2
    for name, module in modules.items():
        sys.modules[_flavours.PACKAGE + ("." + name if name else "")] = module
    importlib.invalidate_caches()
    # test_httpx2 compares the two flavours side by side, which needs the real httpx;
    # respx patches httpx and httpcore, and knows nothing of httpx2.
    collect_ignore += ["tests/test_httpx2.py", "tests/test_respx.py"]
