"""Shared fixtures: a real registry, a client for it, and a real `als serve` mount."""

from __future__ import annotations

import pytest

from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess, write_registries_conf


NO_BACKGROUND = "[fetch]\nbackground = false\n"


def pytest_collection_modifyitems(config, items):
    """Soak tests run only when -m names them (`pytest -m soak`): plain `pytest`, `make test` and
    `-m "not slow"` leave them out. (An addopts `-m "not soak"` would be replaced by any -m given.)"""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


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
