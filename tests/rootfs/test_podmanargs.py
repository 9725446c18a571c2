"""The `podman run` arguments built from an image config (no Podman needed: tests/rootfs/test_podman4.py runs them)."""

from __future__ import annotations

import json
import subprocess

import pytest

from als.errors import ALSError
from als.rootfs.podmanargs import podman_args

FULL = {"config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo a; pwd"], "WorkingDir": "/srv/app",
                   "User": "1000:1000", "Env": ["PATH=/usr/bin:/bin", "FOO=bar baz"], "StopSignal": "SIGINT"}}


def test_options_come_before_rootfs_and_the_command_after():
    a = podman_args(FULL, "/run/als/app")
    assert a.args == ["--entrypoint", '["/bin/sh", "-c"]', "--env", "PATH=/usr/bin:/bin", "--env", "FOO=bar baz",
                      "--env", "container=podman", "--user", "1000:1000", "--workdir", "/srv/app",
                      "--stop-signal", "SIGINT", "--rootfs", "/run/als/app:O", "echo a; pwd"]
    assert json.loads(a.args[1]) == ["/bin/sh", "-c"] and a.warnings == []


def test_bash_mapfile_reads_back_the_same_arguments():
    a = podman_args(FULL, "/run/als/app")
    out = subprocess.run(["bash", "-c", 'mapfile -t args < <(printf %s "$1"); printf "%s\\0" "${args[@]}"', "sh",
                          a.lines()], capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:-1] == a.args


def test_empty_config_gives_only_rootfs_and_the_container_variable():
    assert podman_args({}, "/r").args == ["--env", "container=podman", "--rootfs", "/r:O"]
    assert podman_args({"config": {"Env": ["container=oci"]}}, "/r").args == ["--env", "container=oci",
                                                                              "--rootfs", "/r:O"]


def test_without_cmd_the_user_gives_the_command():
    assert podman_args(FULL, "/r", with_cmd=False).args[-2:] == ["--rootfs", "/r:O"]


def test_missing_workdir_is_left_out_with_a_warning():
    a = podman_args(FULL, "/r", is_dir=lambda p: p != "/srv/app")
    assert "--workdir" not in a.args and "/srv/app does not exist" in a.warnings[0]


def test_volumes_are_named_in_a_warning():
    a = podman_args({"config": {"Volumes": {"/data": {}}}}, "/r")
    assert "/data" in a.warnings[0]


def test_what_cannot_be_printed_is_refused():
    with pytest.raises(ALSError, match="line break"):
        podman_args({"config": {"Env": ["A=x\ny"]}}, "/r").lines()
    with pytest.raises(ALSError, match="':'"):
        podman_args({}, "/r:x")
