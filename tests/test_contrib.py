"""contrib/crio: the storage.conf files, the OpenShift MachineConfigs and ContainerRuntimeConfig.

CRI-O and OpenShift cannot run here, so these are checked for what their
consumers need: the TOML parses and names the store the unit mounts, with
`:ref`; the MachineConfigs parse and have the fields the machineconfiguration
API and Ignition 3 require, and the files they would write on nodes are byte
for byte the ones tested in this repository; the ContainerRuntimeConfig obeys
the schema of openshift/api's ContainerRuntimeConfig and renders, the way the
machine-config operator renders it, to the storage.conf line tested here.
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
SERVICE_MACHINECONFIG = CRIO / "openshift" / "99-worker-als-service.yaml"
CONTAINERRUNTIMECONFIG = CRIO / "openshift" / "als-containerruntimeconfig.yaml"
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


@pytest.mark.parametrize("path, storage_conf", [(MACHINECONFIG, True), (SERVICE_MACHINECONFIG, False)])
def test_the_machineconfigs_are_current(path, storage_conf):
    spec = importlib.util.spec_from_file_location("render", CRIO / "openshift" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert path.read_text() == render.render("worker", storage_conf=storage_conf), (
        f"stale: regenerate {path.name} with contrib/crio/openshift/render.py (see its docstring)")


def test_the_service_machineconfig_leaves_storage_conf_to_the_containerruntimeconfig():
    full = yaml.safe_load(MACHINECONFIG.read_text())["spec"]["config"]
    service = yaml.safe_load(SERVICE_MACHINECONFIG.read_text())["spec"]["config"]
    assert [f["path"] for f in service["storage"]["files"]] == ["/etc/als/config.toml"]
    assert service["systemd"] == full["systemd"]
    assert [f for f in full["storage"]["files"] if f["path"] != "/etc/containers/storage.conf"] == \
        service["storage"]["files"]


# ContainerRuntimeConfig.spec, as openshift/api's machineconfiguration/v1 (types.go, and the CRD it
# generates) defines it from release 4.22 on: the fields of containerRuntimeConfig, and the validation
# of additionalLayerStores (1 to 5 items, unique paths; each {path}, 1 to 256 characters of
# ^/[a-zA-Z0-9/._-]+$ without "//").
RUNTIME_CONFIG_FIELDS = {"pidsLimit", "logLevel", "logSizeMax", "overlaySize", "defaultRuntime",
                         "additionalLayerStores", "additionalImageStores", "additionalArtifactStores",
                         "containerGomaxprocsBehavior"}
STORE_PATH = re.compile(r"^/[a-zA-Z0-9/._-]+$")


def schema_errors(doc: dict) -> list[str]:
    """What the API server would refuse in a ContainerRuntimeConfig (the parts this example uses)."""
    errors = []
    if doc.get("apiVersion") != "machineconfiguration.openshift.io/v1" or doc.get("kind") != "ContainerRuntimeConfig":
        errors.append("apiVersion/kind")
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        errors.append(f"metadata.name {name!r}")
    spec = doc.get("spec", {})
    if set(spec) - {"machineConfigPoolSelector", "containerRuntimeConfig"} or "containerRuntimeConfig" not in spec:
        errors.append(f"spec fields {sorted(spec)}")
    labels = spec.get("machineConfigPoolSelector", {}).get("matchLabels", {})
    if not labels or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        errors.append("machineConfigPoolSelector.matchLabels (a selector that selects nothing applies nowhere)")
    config = spec.get("containerRuntimeConfig") or {}
    if set(config) - RUNTIME_CONFIG_FIELDS:
        errors.append(f"unknown containerRuntimeConfig fields {sorted(set(config) - RUNTIME_CONFIG_FIELDS)}")
    stores = config.get("additionalLayerStores")
    if not isinstance(stores, list) or not 1 <= len(stores) <= 5:
        return errors + ["additionalLayerStores must have 1 to 5 items"]
    paths = []
    for store in stores:
        path = store.get("path") if isinstance(store, dict) else None
        if not isinstance(store, dict) or set(store) != {"path"} or not isinstance(path, str):
            errors.append(f"additionalLayerStores item {store!r}: only a required path")
            continue
        if not 1 <= len(path) <= 256 or not STORE_PATH.match(path) or "//" in path:
            errors.append(f"path {path!r}")
        paths.append(path)
    if len(set(paths)) != len(paths):
        errors.append("additionalLayerStores must not contain duplicate paths")
    return errors


def mco_additionallayerstores(doc: dict) -> list[str]:
    """storage.conf's additionallayerstores as the machine-config operator writes them (release 4.22 on):
    each path, with ":ref" appended unless it ends with it already."""
    return [p if p.endswith(":ref") else p + ":ref"
            for p in (s["path"] for s in doc["spec"]["containerRuntimeConfig"]["additionalLayerStores"])]


def test_the_containerruntimeconfig_obeys_the_api_schema():
    doc = yaml.safe_load(CONTAINERRUNTIMECONFIG.read_text())
    assert schema_errors(doc) == []
    assert doc["spec"]["machineConfigPoolSelector"]["matchLabels"] == \
        {"pools.operator.machineconfiguration.openshift.io/worker": ""}
    # What the API refuses, so the check above can fail: ":ref" in the path, "//", six stores, twins.
    store = doc["spec"]["containerRuntimeConfig"]["additionalLayerStores"]
    for bad in ([{"path": "/var/lib/als/store:ref"}], [{"path": "/var//als"}], [{"path": f"/s{i}"} for i in range(6)],
                [{"path": "/s"}, {"path": "/s"}], [{"path": "/s", "ref": True}], []):
        store[:] = bad
        assert schema_errors(doc), bad


def test_the_containerruntimeconfig_renders_to_the_store_with_ref():
    """":ref" cannot be written in the API object, and survives because the operator appends it."""
    doc = yaml.safe_load(CONTAINERRUNTIMECONFIG.read_text())
    rendered = mco_additionallayerstores(doc)
    assert rendered == [unit_mountpoint(UNIT.read_text()) + ":ref"]
    assert rendered == tomllib.loads((CRIO / "storage.conf").read_text())["storage"]["options"]["additionallayerstores"]


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
