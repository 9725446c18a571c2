"""Helpers shared by the tests of a store that restarts: the kernel's part, and an image to serve.

A successor takes a live FUSE connection over only where the kernel can
re-send the requests the dead store had taken (FUSE_NOTIFY_RESEND, Linux 6.9).
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from als.tools.image import BuiltLayer, estargz_layer, push_image
from als.tools.podman import Podman
from tests.support import images
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess


def kernel_can_resend() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 9)


def push_tree(registry: RegistryProcess, conf: Path, name: str, chunk_size: int,
              tars: Callable[[], list[bytes]] = images.tree_layers, retries: int = 0) -> tuple[str, list[BuiltLayer]]:
    """Push the test tree image as eStargz to ``registry`` under ``name``: its reference and layers."""
    client = RegistryClient(RegistriesConf.load(str(conf)), retries=retries)
    layers = [estargz_layer(io.BytesIO(t), chunk_size=chunk_size) for t in tars()]
    ref = f"{registry.host}/{name}"
    push_image(client, parse_reference(ref), layers)
    return ref, layers


@contextmanager
def podman_on(store: StoreProcess, workdir: Path, registry: RegistryProcess) -> Iterator[Podman]:
    """Podman with ``store`` as its additional layer store; ``pid_namespace=False`` so that its containers
    outlive a command. On the way out, a store that is down is started again so that Podman can clean up."""
    podman = Podman(workdir, additional_layer_store=store.mountpoint, insecure_registries=[registry.host],
                    pid_namespace=False)
    try:
        yield podman
    finally:
        if not store.proc:
            store.stop()  # clears a dead mount
            store.start()
        podman.close()


class FakeSystemd:
    """$NOTIFY_SOCKET of a service manager with a file descriptor store, as the test drives it."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)
        self.path = path
        self.store: dict[str, int] = {}

    def collect(self, names):
        """Read messages until descriptors for every name in ``names`` were stored (at most 30 s)."""
        deadline = time.monotonic() + 30
        while not all(n in self.store for n in names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no descriptors named {names} reached the fd store")
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if fields.get("FDSTORE") == "1" and fds:
                self.store[fields["FDNAME"]] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def restart_with_stored_fds(self, store: StoreProcess) -> None:
        """Wait for the store's descriptors, and start it from now on as systemd would restart the service:
        the stored descriptors from fd 3, with their names in $LISTEN_FDNAMES."""
        self.collect(["als-main", "als-noxattr"])
        main, plain = self.store["als-main"], self.store["als-noxattr"]
        store.wrapper = ("bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=als-main:als-noxattr exec "$@" '
                                     f'3<&{main} 4<&{plain}', "bash")
        store.pass_fds = (main, plain)

    def close(self):
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()
