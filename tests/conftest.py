"""Fixtures of the end-to-end tests: local upstreams, mitmdump processes and API clients."""

import pathlib
from collections.abc import Callable, Iterator

import pytest

from tests.e2e_support import Api, Mitmdump, Upstream, tls_server_context


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A plain-HTTP upstream on a free loopback port."""
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def other_upstream() -> Iterator[Upstream]:
    """A second plain-HTTP upstream on another free loopback port."""
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def tls_upstream(tmp_path: pathlib.Path) -> Iterator[Upstream]:
    """An HTTPS upstream with a self-signed certificate for 127.0.0.1, written to tmp_path."""
    server = Upstream(tls_server_context(tmp_path)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy_extra_args() -> tuple[str, ...]:
    """Extra mitmdump arguments of the module's `proxy`, which a test module overrides to set options."""
    return ()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, proxy_extra_args: tuple[str, ...]) -> Iterator[Mitmdump]:
    """One mitmdump with default mitmkeys options plus `proxy_extra_args`, shared by the tests of a module."""
    directory = tmp_path_factory.mktemp("mitmdump")
    process = Mitmdump(directory, directory / "keys.db", proxy_extra_args).start()
    yield process
    process.stop()


@pytest.fixture
def api(proxy: Mitmdump) -> Api:
    """The management API of the module's mitmdump, on its direct loopback port."""
    return proxy.api()


@pytest.fixture
def start_mitmdump(tmp_path: pathlib.Path) -> Iterator[Callable[..., Mitmdump]]:
    """Start mitmdump processes for one test; all are stopped at teardown.

    Call it as start_mitmdump("--set", "keys_strict=true", keys_db=path). Processes given
    the same keys_db share one database; the default is tmp_path/keys.db.
    """
    started: list[Mitmdump] = []

    def start(*extra_args: str, keys_db: pathlib.Path | None = None) -> Mitmdump:
        directory = tmp_path / f"mitmdump-{len(started)}"
        directory.mkdir()
        process = Mitmdump(directory, keys_db or tmp_path / "keys.db", tuple(extra_args))
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
