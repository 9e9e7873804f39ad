"""The httpx2 flavour: the same layers, speaking httpx2, with nothing aliased in the process."""

from __future__ import annotations

import sys

import httpx
import httpx2
import pytest
from conftest import where
from prometheus_client import CollectorRegistry

import resilient_http
import resilient_http.httpx2 as rh2


def test_the_httpx2_flavour_offers_the_same_public_names() -> None:
    """``resilient_http.httpx2`` exports exactly what ``resilient_http`` does."""
    assert rh2.__all__ == resilient_http.__all__
    assert all(hasattr(rh2, name) for name in rh2.__all__)


def test_policies_are_shared_and_http_objects_are_httpx2s() -> None:
    """One Policy class serves both; the transport and its exceptions belong to httpx2."""
    assert rh2.Policy is resilient_http.Policy
    assert rh2.ConfigurationError is resilient_http.ConfigurationError
    assert issubclass(rh2.ResilientTransport, httpx2.AsyncBaseTransport)
    assert not issubclass(rh2.ResilientTransport, httpx.AsyncBaseTransport)
    assert issubclass(rh2.CircuitOpenError, httpx2.TransportError)
    assert issubclass(rh2.DeadlineExceededError, httpx2.TimeoutException)
    assert not issubclass(rh2.CircuitOpenError, httpx.HTTPError)


def test_nothing_is_aliased_in_the_process() -> None:
    """``import httpx`` still gives httpx: the flavour never touches sys.modules["httpx"]."""
    assert sys.modules["httpx"] is httpx
    assert httpx is not httpx2


async def test_an_httpx2_client_gets_retries_and_its_call_info() -> None:
    """503s with Retry-After are retried through an httpx2.AsyncClient; call_info reads the httpx2 response."""
    answers = iter([503, 503, 200])

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(next(answers), headers={"Retry-After": "0"}, text="ok")

    transport = rh2.ResilientTransport(inner=httpx2.MockTransport(handler), registry=CollectorRegistry())
    async with httpx2.AsyncClient(transport=transport) as client:
        response = await client.get("https://api.example.com/")
    assert isinstance(response, httpx2.Response)
    assert response.status_code == 200
    info = rh2.call_info(response)
    assert info is not None and info.attempts == 3


async def test_an_open_circuit_is_an_httpx2_transport_error() -> None:
    """An httpx2 caller catching ``httpx2.TransportError`` catches the breaker's refusal."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(500)

    policy = rh2.Policy(
        retry=None, circuit_breaker=rh2.CircuitBreakerPolicy(minimum_calls=2, failure_ratio=0.5, break_duration=60)
    )
    transport = rh2.ResilientTransport(
        default=policy, inner=httpx2.MockTransport(handler), registry=CollectorRegistry()
    )
    async with httpx2.AsyncClient(transport=transport) as client:
        for _ in range(2):
            await client.get("https://api.example.com/")
        with pytest.raises(httpx2.TransportError) as caught:
            await client.get("https://api.example.com/")
    assert isinstance(caught.value, rh2.CircuitOpenError)
    info = rh2.call_info(caught.value)
    assert info is not None and info.circuit_state == "open"


def test_shared_modules_import_no_http_package() -> None:
    """What both flavours share imports neither httpx nor a module that does, so httpx2 alone would do."""
    import ast
    from pathlib import Path

    from resilient_http import _flavours

    root = Path(resilient_http.__file__).parent

    def imports(nodes: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
        found: list[ast.Import | ast.ImportFrom] = []
        for node in nodes:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue  # for the type checker only: never run
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    found.extend(imports([child]))
        return found

    for name in _flavours.SHARED:
        package = (root / name).is_dir()  # a shared package: each of its modules, which may import each other
        for path in sorted((root / name).glob("*.py")) if package else [root / f"{name}.py"]:
            for node in imports(ast.parse(path.read_text()).body):
                if isinstance(node, ast.Import):
                    assert not any(alias.name.split(".")[0] in _flavours.RENAMES for alias in node.names), path
                elif node.level == 0:
                    assert (node.module or "").split(".")[0] not in _flavours.RENAMES, path
                elif not (package and node.level == 1):
                    assert node.level == 1 + package, (path, node.module)
                    assert (node.module or "").split(".")[0] in _flavours.SHARED, (path, node.module)


async def test_both_flavours_share_one_registry() -> None:
    """An httpx transport and an httpx2 transport, named apart, export side by side on one registry."""
    registry = CollectorRegistry()
    plain = resilient_http.ResilientTransport(
        inner=httpx.MockTransport(lambda request: httpx.Response(200)), registry=registry, name="plain"
    )
    second = rh2.ResilientTransport(
        inner=httpx2.MockTransport(lambda request: httpx2.Response(200)), registry=registry, name="second"
    )
    async with httpx.AsyncClient(transport=plain) as one, httpx2.AsyncClient(transport=second) as two:
        await one.get("https://api.example.com/")
        await two.get("https://api.example.com/")
        for name in ("plain", "second"):
            labels = {"transport": name, **where("api.example.com:443"), "outcome": "2xx"}
            assert registry.get_sample_value("resilient_http_requests_total", labels) == 1.0


_BLOCK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
"""

_CALL = """
import asyncio
import {package} as http
from {library} import Policy, ResilientTransport, call_info

async def main():
    answers = iter([503, 200])
    transport = ResilientTransport(
        default=Policy(),
        inner=http.MockTransport(lambda request: http.Response(next(answers), headers={{"Retry-After": "0"}})),
    )
    async with http.AsyncClient(transport=transport) as client:
        response = await client.get("https://api.example.com/")
    print(response.status_code, call_info(response).attempts)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("blocked", "package", "library"),
    [(("httpx", "httpcore"), "httpx2", "resilient_http.httpx2"), (("httpx2", "httpcore2"), "httpx", "resilient_http")],
)
def test_either_package_works_installed_alone(blocked: tuple[str, ...], package: str, library: str) -> None:
    """With the other HTTP package missing from the process, each flavour still imports and retries."""
    import subprocess

    code = _BLOCK.format(blocked=set(blocked)) + _CALL.format(package=package, library=library)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "2"]


def test_a_missing_http_package_is_named_with_its_extra() -> None:
    """``resilient_http.ResilientTransport`` without httpx says which extra to install."""
    import subprocess

    code = _BLOCK.format(blocked={"httpx", "httpcore"}) + "import resilient_http\nresilient_http.ResilientTransport\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "pip install 'resilient-http-transport[httpx]'" in done.stderr
    assert "resilient_http.httpx2" in done.stderr
