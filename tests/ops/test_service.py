"""Running as a service: the systemd unit, sd_notify readiness, capabilities, JSON logs.

systemd is not PID 1 on this machine, so the unit is checked with
`systemd-analyze verify` and by parsing it, its capability set is enforced
on a real `als serve` with setpriv, and the notify protocol is spoken to a
socket of our own exactly as systemd would receive it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from als.ops import notify
from tests.support.store_process import REPO, StoreProcess, is_mounted

UNIT = REPO / "contrib" / "systemd" / "als.service"

# Options that give a unit its own mount namespace, which would hide the FUSE mount from the engines.
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
               "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables", "ProtectKernelModules",
               "ProtectControlGroups", "ProtectProc", "PrivateMounts", "MountFlags", "TemporaryFileSystem",
               "BindPaths", "ProtectKernelLogs", "ProtectClock", "RootDirectory", "PrivateUsers")


def unit_options(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def install_files(dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", "install-files", f"DESTDIR={dest}",
                           f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_installed_unit_passes_systemd_analyze_verify(tmp_path):
    r = install_files(tmp_path)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc/systemd/system/als.service"
    als_bin = Path(sysconfig.get_path("scripts")) / "als"
    assert unit_options(unit)["ExecStart"] == [f"{als_bin} serve --root /var/lib/als /var/lib/als/store"]
    assert (tmp_path / "etc/als/config.toml").read_text() == (REPO / "config/config.toml").read_text()
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stderr == "", v.stderr  # unknown keys would be warned about here

    # Unknown directives are caught (so the check above can fail).
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileged=yes"))
    v = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'NoNewPrivileged'" in v.stderr


def test_install_keeps_an_existing_config(tmp_path):
    conf = tmp_path / "etc/als/config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("[resolve]\ntimeout = 5.0\n")
    r = install_files(tmp_path)
    assert r.returncode == 0 and "kept" in r.stdout
    assert conf.read_text() == "[resolve]\ntimeout = 5.0\n"


def test_the_unit_is_ordered_before_the_engines_and_keeps_the_mount_visible():
    o = unit_options(UNIT)
    assert o["Type"] == ["notify"] and o["NotifyAccess"] == ["main"]
    before = " ".join(o["Before"]).split()
    for engine in ("crio.service", "podman.service", "podman-restart.service", "kubelet.service"):
        assert engine in before
    assert o["Restart"] == ["on-failure"]
    assert o["DeviceAllow"] == ["/dev/fuse rw"] and o["DevicePolicy"] == ["closed"]
    # the FUSE connections are kept across restarts: an unmount after stop would take them from the next start
    assert o["FileDescriptorStoreMax"] == ["4"] and "ExecStopPost" not in o
    assert o["WantedBy"] == ["multi-user.target"]
    assert not [k for k in o if k in NAMESPACING], "these would hide the FUSE mount from Podman and CRI-O"


def _caps(unit_value: str) -> str:
    return ",".join("+" + c.lower().removeprefix("cap_") for c in unit_value.split())


def test_the_unit_capabilities_are_enough_to_serve(tmp_path, registries_conf):
    """`als serve` under exactly the unit's bounding set and no_new_privs mounts and serves."""
    caps = _caps(unit_options(UNIT)["CapabilityBoundingSet"][0])
    wrapper = ("setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--")
    (tmp_path / "ok").mkdir()
    s = StoreProcess(tmp_path / "ok", registries_conf=registries_conf, wrapper=wrapper)
    s.start()
    try:
        status = Path(f"/proc/{s.proc.pid}/status").read_text()
        eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
        assert eff == (1 << 21) | (1 << 2), hex(eff)  # CAP_SYS_ADMIN | CAP_DAC_READ_SEARCH
        assert os.listdir(s.mountpoint) == []
        assert s.stop() == 0
    finally:
        s.stop()
    assert not is_mounted(s.mountpoint)

    # Without CAP_SYS_ADMIN it cannot mount: the set above is what makes it work.
    (tmp_path / "no").mkdir()
    s = StoreProcess(tmp_path / "no", wrapper=("setpriv", "--no-new-privs", "--bounding-set=-all,+dac_read_search",
                                               "--inh-caps=-all", "--"))
    with pytest.raises(RuntimeError, match="exited"):
        s.start(timeout=20)
    assert not is_mounted(s.mountpoint)


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(20)

    def receive(self) -> dict[str, str]:
        """The next message but descriptors handed over (``FDSTORE=1``), which are dropped."""
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            for fd in fds:
                os.close(fd)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "FDSTORE" not in fields:
                return fields

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_once_mounted_and_stopping_on_sigterm(tmp_path, abstract):
    name = f"@als-test-notify-{os.getpid()}-{abstract}" if abstract else str(tmp_path / "notify.sock")
    listener = NotifyListener(b"\0" + name[1:].encode() if abstract else name)
    s = StoreProcess(tmp_path, env={"NOTIFY_SOCKET": name})
    seen: dict[str, object] = {}

    def wait_ready():
        seen["ready"] = listener.receive()
        seen["mounted_then"] = is_mounted(s.mountpoint)

    t = threading.Thread(target=wait_ready)
    t.start()
    try:
        s.start()
        t.join(20)
        assert seen["ready"]["READY"] == "1" and seen["mounted_then"] is True
        assert seen["ready"]["STATUS"] == f"serving {s.mountpoint}"
        assert s.stop(signal.SIGTERM) == 0
        stopping = listener.receive()
        assert stopping["STOPPING"] == "1"
    finally:
        s.stop()
        listener.close()
        t.join(5)


def test_notify_is_a_no_op_outside_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify(ready=1) is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.notify(ready=1) is False  # logged, never raised


def test_json_log_lines(tmp_path):
    s = StoreProcess(tmp_path, args=("--log-format", "json"), log_level="info")
    s.start()
    try:
        os.listdir(s.mountpoint)
    finally:
        assert s.stop(signal.SIGINT) == 0  # stop for good: SIGTERM leaves the mount to a successor
    lines = [l for l in s.log().splitlines() if l.strip()]
    docs = [json.loads(l) for l in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "pid"} <= d.keys() for d in docs)
    messages = [d["message"] for d in docs]
    assert f"store mounted at {s.mountpoint} and answering" in messages
    assert f"unmounted {s.mountpoint}" in messages
    assert all(d["level"] in ("info", "warning", "error") for d in docs)
