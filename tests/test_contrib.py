"""contrib/crio: the storage.conf files and the OpenShift MachineConfig.

CRI-O and OpenShift cannot run here, so these are checked for what their
consumers need: the TOML parses and names the store the unit mounts, with
`:ref`; the MachineConfig parses and has the fields the machineconfiguration
API and Ignition 3 require, and the files it would write on nodes are byte
for byte the ones tested in this repository.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import tomllib
import urllib.parse

import pytest
import yaml

from tests.support.store_process import REPO

CRIO = REPO / "contrib" / "crio"
MACHINECONFIG = CRIO / "openshift" / "99-worker-als.yaml"
UNIT = REPO / "contrib" / "systemd" / "als.service"


def unit_mountpoint(text: str) -> str:
    execstart = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()
    assert execstart[1] == "serve"
    return execstart[-1]


def decode_data_url(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.startswith("data:"), url[:40]
    return base64.b64decode(data) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(data)


@pytest.mark.parametrize("path", ["storage.conf", "storage.conf.d/50-als.conf"])
def test_storage_conf_names_the_store_the_unit_mounts(path):
    conf = tomllib.loads((CRIO / path).read_text())
    stores = conf["storage"]["options"]["additionallayerstores"]
    assert stores == [unit_mountpoint(UNIT.read_text()) + ":ref"]
    if path == "storage.conf":
        assert conf["storage"]["driver"] == "overlay"  # only overlay honours additional layer stores


def test_the_machineconfig_is_current():
    spec = importlib.util.spec_from_file_location("render", CRIO / "openshift" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert MACHINECONFIG.read_text() == render.render("worker"), (
        "stale: python3 contrib/crio/openshift/render.py > contrib/crio/openshift/99-worker-als.yaml")


def test_the_machineconfig_has_what_the_api_needs():
    mc = yaml.safe_load(MACHINECONFIG.read_text())
    assert mc["apiVersion"] == "machineconfiguration.openshift.io/v1"
    assert mc["kind"] == "MachineConfig"
    name = mc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 253
    assert mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"] == "worker"
    config = mc["spec"]["config"]
    assert isinstance(config["ignition"]["version"], str)
    assert re.fullmatch(r"3\.[0-4]\.0", config["ignition"]["version"])

    files = {f["path"]: f for f in config["storage"]["files"]}
    for f in files.values():
        assert f["path"].startswith("/") and isinstance(f["mode"], int) and 0 <= f["mode"] <= 0o7777
        assert f["overwrite"] is True and set(f) <= {"path", "mode", "overwrite", "contents", "user", "group"}
    assert decode_data_url(files["/etc/als/config.toml"]["contents"]["source"]) == \
        (REPO / "config/config.toml").read_bytes()
    storage = decode_data_url(files["/etc/containers/storage.conf"]["contents"]["source"])
    assert storage == (CRIO / "storage.conf").read_bytes()
    assert tomllib.loads(storage.decode())["storage"]["options"]["additionallayerstores"] == \
        ["/var/lib/als/store:ref"]

    units = {u["name"]: u for u in config["systemd"]["units"]}
    als = units["als.service"]
    assert als["enabled"] is True and als["contents"] == UNIT.read_text()
    assert "Type=notify" in als["contents"] and "Before=crio.service" in als["contents"]
    dropin = units["crio.service"]["dropins"][0]
    assert dropin["name"].endswith(".conf")
    assert dropin["contents"] == (CRIO / "crio.service.d/10-als.conf").read_text()
    assert "After=als.service" in dropin["contents"] and "Wants=als.service" in dropin["contents"]
