"""`als serve`: wire config, registry, cache and store together and mount them."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from pathlib import Path

from als.cache import ChunkCache
from als.config import load_config
from als.control import ControlServer, socket_path
from als.errors import ALSError
from als.fetch import ChunkFetcher
from als.fusefs import ALSFuse
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from als.state import StateDir
from als.store import Store

log = logging.getLogger("als")


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def clear_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a FUSE mount whose daemon died ("Transport endpoint is not connected").

    A live mount (another store still serving) is left alone and is an error.
    Reading the directory, not stat, tells the two apart: the kernel may answer
    stat from its attribute cache even when the daemon is gone.
    """
    try:
        if not _mounted(mountpoint):
            return
        os.listdir(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise ALSError(f"cannot use {mountpoint}: {e}") from None
    else:
        raise ALSError(f"{mountpoint} is already mounted by a running store")
    log.warning("clearing the stale mount on %s left by a store that died", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["fusermount", "-u", "-z", str(mountpoint)],
                ["umount", "-l", str(mountpoint)]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise ALSError(f"cannot clear the stale mount on {mountpoint}")


def fuse_options(config) -> list[str]:
    f = config.fuse
    return [
        "allow_other",  # the engine, conmon and containers are not always the mounting user
        "default_permissions",  # the kernel enforces each file's mode bits
        "use_ino",  # our inode numbers: hard links share one
        "suid", "dev",  # setuid binaries and device nodes in images work as after a normal pull
        "kernel_cache",  # content never changes: keep pages across opens
        "fsname=als", "subtype=als",
        f"entry_timeout={f.entry_timeout:g}", f"attr_timeout={f.attr_timeout:g}",
        f"negative_timeout={f.negative_timeout:g}",
        "max_read=1048576",
    ]


def build_store(root: Path, config) -> Store:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    registries = RegistriesConf.load(config.registry.registries_conf or None)
    client = RegistryClient(registries, connect_timeout=config.registry.connect_timeout,
                            read_timeout=config.registry.read_timeout, retries=config.registry.retries)
    cache = ChunkCache(root / "cache", memory_bytes=config.cache.memory_bytes, max_bytes=config.cache.max_bytes)
    f = config.fetch
    fetcher = ChunkFetcher(cache, coalesce_gap=f.coalesce_gap, max_request=f.max_request,
                           wait_timeout=f.read_timeout, readahead_min=f.readahead_min,
                           readahead_max=f.readahead_max)
    return Store(config, client, fetcher, StateDir(root / "state"))


def control_handlers(store: Store) -> dict:
    """What the control socket answers, by operation name."""
    return {"ping": lambda req: "pong"}


def serve(mountpoint: Path, root: Path, config_path: str | None) -> int:
    config = load_config(config_path)
    clear_stale_mount(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    store = build_store(root, config)
    control = ControlServer(socket_path(root), control_handlers(store)).start()
    server = ALSFuse(store, usage="als serve", dash_s_do="setsingle")
    server.multithreaded = True
    server.fuse_args.mountpoint = str(mountpoint)
    server.fuse_args.setmod("foreground")
    for opt in fuse_options(config):
        server.fuse_args.add(opt)
    # libfuse installs its SIGINT handler (unmount and return) only over the default one.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    log.info("serving the additional layer store at %s (cache and state in %s)", mountpoint, root)
    try:
        server.main()
    finally:
        control.close()
        store.close()
    log.info("unmounted %s", mountpoint)
    return 0
