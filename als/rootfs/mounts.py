"""The daemon's root file system mounts: `als mount`, `als umount`, their record and their release.

A mount resolves the image exactly as a lookup from Podman would (the same
resolution, registries.conf, credentials and verification), waits for every
layer, and mounts nothing unless all of them can be served lazily. Its layers
are then in use (never evicted) until `als umount`. The record is kept in
memory for `als status` and in ``<root>/state/rootfs.json``. When the daemon
stops for good, it detaches its overlays before its own FUSE mounts: a dead
overlay left at DIR would fail every access with "transport endpoint is not
connected". When it hands its FUSE connections over to a successor (or dies
while a keeper holds them), the overlays rest on a mount that stays alive, so
they stay, and the successor takes their records (and their layers' use) over.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from als.errors import ALSError
from als.files import atomic_write, private_dir
from als.reference import parse_reference
from als.rootfs import mountinfo, overlay
from als.store.namespace import LayerUnavailable, Store

log = logging.getLogger("als.rootfs")

RECORDS = "rootfs.json"


@dataclass
class RootfsMount:
    """One image mounted as a root file system."""

    image: str  # the reference, pinned to a platform's manifest when one was asked for
    dir: str
    manifest: str
    config_digest: str
    layers: list[str]  # blob digests, bottom first, as the image lists them
    device: list[int]  # [major, minor] of the overlay
    method: str  # "lowerdir+" or "mount(2)"
    mounted_at: float

    def as_dict(self) -> dict:
        return asdict(self)


class RootfsMounts:
    """The root file systems this daemon has mounted over its store at ``mountpoint``."""

    def __init__(self, store: Store, mountpoint: Path, root: Path, resumed: bool = False):
        """``resumed``: the store took over the previous one's live FUSE connections, so the overlays
        that one mounted over them may still be there and working."""
        self.store = store
        self.mountpoint = Path(mountpoint)
        self.dir = private_dir(Path(root) / "rootfs")
        self.records_path = store.state.root / RECORDS
        self._lock = threading.Lock()
        self._mounts: dict[str, RootfsMount] = {}
        self._pending: set[Path] = set()  # targets being mounted now
        self._take_previous(resumed)

    def _take_previous(self, resumed: bool) -> None:
        """Mounts recorded by an earlier run: taken over if still there on a connection this store took
        over; otherwise they were detached when it stopped (or are dead with the mount it served)."""
        try:
            previous = json.loads(self.records_path.read_text())
        except (OSError, ValueError):
            return
        for raw in previous if isinstance(previous, list) else []:
            m = _record(raw) if resumed else None
            if m is not None and _still_mounted(m):
                self._mounts[m.dir] = m
                for d in dict.fromkeys(m.layers):
                    self.store.use(m.image, d)
                log.info("image %s: root file system at %s taken over from the previous store", m.image, m.dir)
                continue
            log.warning("the root file system of image %s at %s did not survive the restart of the store: "
                        "run `als mount` again", raw.get("image") if isinstance(raw, dict) else raw,
                        raw.get("dir") if isinstance(raw, dict) else "")
        self._save()

    def _save(self) -> None:
        data = json.dumps([m.as_dict() for m in self._mounts.values()], indent=1).encode()
        atomic_write(self.records_path, data, self.records_path.parent)

    def list(self) -> list[dict]:
        with self._lock:
            return [m.as_dict() for m in self._mounts.values()]

    def config(self, m: RootfsMount) -> dict:
        blob = self.store.state.get_blob(m.config_digest)
        return json.loads(blob) if blob else {}

    # ---- mount ------------------------------------------------------------------------
    def mount(self, image: str, target: str, platform: str = "", namespace: str = "") -> dict:
        """Mount ``image`` on ``target`` read-only (or find it mounted there already); its record and config.

        ``namespace``: the mount namespace the user's Podman runs in, when `als mount` was run inside
        `podman unshare`; the overlay is mounted in the store's own, so they must be the same.
        """
        self._check_namespace(namespace, target)
        try:
            ref = str(parse_reference(image))
        except ValueError as e:
            raise ALSError(str(e)) from None
        if platform:
            ref = self.store.resolver.pinned(ref, platform)
        path = self._check_target(target)
        with self._lock:
            existing = self._mounts.get(str(path))
            if existing is not None:
                if existing.image != ref:
                    raise ALSError(f"{path} already holds the root file system of image {existing.image}")
                return {"mount": existing.as_dict(), "config": self.config(existing), "new": False}
            if path in self._pending:
                raise ALSError(f"{path} is being mounted by another `als mount`")
            self._pending.add(path)
        try:
            res = self._mount(ref, path)  # outside the lock: resolving may take a while, status goes on
            with self._lock:
                self._mounts[str(path)] = res
                self._save()
        finally:
            with self._lock:
                self._pending.discard(path)
        return {"mount": res.as_dict(), "config": self.config(res), "new": True}

    @staticmethod
    def _check_namespace(namespace: str, target: str) -> None:
        """`podman unshare` joins the namespaces Podman's pause process keeps; when that process stops
        (`podman system migrate`, a reboot of the user's session), Podman makes new ones and a store
        started in the old ones mounts where no container of that Podman would see it."""
        own = mountinfo.own_namespace()
        if namespace and namespace != own:
            raise ALSError(f"Podman's containers would not see {target}: this `podman unshare` is in mount "
                           f"namespace {namespace}, the store in {own}. Podman made its rootless namespaces anew "
                           f"after the store started in them (its pause process stopped, e.g. by `podman system "
                           f"migrate`): stop the store and start it again in `podman unshare`")

    def _check_target(self, target: str) -> Path:
        if not os.path.isabs(target):
            raise ALSError(f"{target}: give an absolute path")
        path = Path(os.path.realpath(target))
        if not path.is_dir():
            raise ALSError(f"{target} is not a directory")
        if path == self.mountpoint or self.mountpoint in path.parents or path in self.mountpoint.parents:
            raise ALSError(f"{target} is inside or above the store's mount {self.mountpoint}")
        if os.path.ismount(path) and str(path) not in self._mounts:
            raise ALSError(f"{target} is a mount point already: mount the image on an empty directory")
        return path

    def _mount(self, ref: str, path: Path) -> RootfsMount:
        image = self.store.image(ref)
        self._wait_for_layers(ref, image)
        digests = [d.digest for d in image.layers]
        unique = list(dict.fromkeys(reversed(digests)))  # topmost first; a repeated layer at its top place
        ref_dir = self.mountpoint / base64.b64encode(ref.encode()).decode()
        lowers = [ref_dir / d / "diff" for d in unique]
        if len(lowers) == 1:
            # The kernel wants two lower directories when there is no upper one.
            lowers.append(private_dir(self.dir / "empty"))
        for d in unique:
            self.store.use(ref, d)
        try:
            method = overlay.mount_overlay(path, lowers)
        except ALSError:
            for d in unique:
                self.store.release(ref, d)
            raise
        st = os.stat(path)
        m = RootfsMount(image=ref, dir=str(path), manifest=image.manifest_digest, config_digest=image.config_digest,
                        layers=digests, device=[os.major(st.st_dev), os.minor(st.st_dev)], method=method,
                        mounted_at=time.time())
        log.info("image %s: root file system mounted read-only at %s (%d layers, %s)", ref, path, len(unique), method)
        return m

    def _wait_for_layers(self, ref: str, image) -> None:
        """Every layer must be servable lazily; the message names each one that is not."""
        declined = []
        for i, desc in enumerate(image.layers):
            try:
                self.store.layer(ref, desc.digest)
            except LayerUnavailable as e:
                declined.append(f"layer {i + 1} of {len(image.layers)} {desc.digest}: "
                                f"{str(e).removeprefix(f'image {ref} layer {desc.digest}: ')}")
        if declined:
            raise ALSError(f"image {ref} cannot be mounted lazily, nothing was mounted: " + "; ".join(declined))

    # ---- unmount ----------------------------------------------------------------------
    def umount(self, target: str, force: bool = False) -> dict:
        """Unmount ``target`` and release its layers; refuse while a container rests on it, unless ``force``."""
        path = os.path.realpath(target) if os.path.isabs(target) else target
        with self._lock:
            m = self._mounts.get(path)
            if m is None:
                known = ", ".join(self._mounts) or "none"
                raise ALSError(f"{target} is not a root file system mounted by this store (mounted: {known})")
            users = mountinfo.users(m.dir, (m.device[0], m.device[1]))
            if users and not force:
                raise ALSError(f"{m.dir} is in use by {len(users)} mount(s): "
                               + "; ".join(u.describe() for u in users)
                               + ". Stop the containers on it first, or give --force to detach it anyway "
                                 "(they keep running on its files)")
            overlay.unmount(Path(m.dir), detach=force)
            del self._mounts[path]
            self._save()
        for d in dict.fromkeys(m.layers):
            self.store.release(m.image, d)
        log.info("image %s: root file system at %s unmounted%s", m.image, m.dir,
                 f" (detached from {len(users)} users)" if users else "")
        return {"mount": m.as_dict(), "detached_users": [u.describe() for u in users]}

    def close(self, handed_over: bool = False) -> None:
        """Detach every overlay before the store's FUSE mounts go (the daemon is stopping), unless
        those mounts are handed over to a successor: then the overlays stay for it to take over."""
        with self._lock:
            if handed_over:
                for m in self._mounts.values():
                    log.info("image %s: root file system at %s left to the next store", m.image, m.dir)
                return
            for m in self._mounts.values():
                try:
                    overlay.unmount(Path(m.dir), detach=True)
                    log.info("image %s: root file system at %s detached as the store stops; containers on it "
                             "lose their files", m.image, m.dir)
                except ALSError as e:
                    log.error("image %s: %s", m.image, e)


def _record(raw: object) -> RootfsMount | None:
    """A saved record, or None if it is not one (a file from another version, a damaged one)."""
    try:
        return RootfsMount(**raw) if isinstance(raw, dict) else None
    except TypeError:
        return None


def _still_mounted(m: RootfsMount) -> bool:
    """Whether the overlay of record ``m`` is still mounted at its directory (same device). Read from
    mountinfo, never by a stat: the overlay's root asks the store's mount, which this store, still
    starting, does not answer yet."""
    try:
        mounts = mountinfo.parse(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return False
    dev = f"{m.device[0]}:{m.device[1]}" if len(m.device) == 2 else ""
    return any(x.mount_point == m.dir and x.device == dev and x.fstype == "overlay" for x in mounts)
