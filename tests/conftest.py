"""Shared fixtures: a real registry, a client for it, a real `als serve` mount, the store over an in-memory
registry (``mem``); and the tiers.

Tests that need real parts (those fixtures among them) are marked ``real``
from their code (tests/support/tiers.py), so ``-m "not real"`` (`make
test-fast`) runs the rest; in those, starting a real part fails.
"""

from __future__ import annotations

import pytest

from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support import memstore, tiers
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess, write_registries_conf


NO_BACKGROUND = "[fetch]\nbackground = false\n"


def pytest_collection_modifyitems(config, items):
    """Tests that need real parts are marked ``real`` (tests/support/tiers.py says how it is decided).

    Soak tests run only when -m names them (`pytest -m soak`): plain `pytest`, `make test` and
    `-m "not slow"` leave them out. (An addopts `-m "not soak"` would be replaced by any -m given.)"""
    tiers.mark_real(items)
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked ``real`` runs in `make test-fast`: starting a real part in it is a failure."""
    if item.get_closest_marker(tiers.MARK):
        return (yield)
    with tiers.guarded():
        return (yield)


@pytest.fixture(scope="module")
def registry():
    with RegistryProcess() as r:
        yield r


@pytest.fixture(scope="module")
def registries_conf(registry, tmp_path_factory):
    return write_registries_conf(tmp_path_factory.mktemp("conf") / "registries.conf", [registry.host])


@pytest.fixture(scope="module")
def client(registries_conf):
    return RegistryClient(RegistriesConf.load(str(registries_conf)), retries=1)


@pytest.fixture(scope="module")
def store(registries_conf, tmp_path_factory):
    # No background fetch here: these tests measure what reads alone fetch.
    with StoreProcess(tmp_path_factory.mktemp("als"), registries_conf=registries_conf,
                      config=NO_BACKGROUND) as s:
        yield s


@pytest.fixture
def mem(tmp_path):
    """The store and its file system over an in-memory registry, in this process (tests/support/memstore.py)."""
    with memstore.harness(tmp_path) as h:
        yield h
