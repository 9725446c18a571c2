"""The store killed with SIGKILL mid-fetch and mid-write, many times; the cache disk full.

Each round starts a real `als serve`, lets readers and the background fetch
run, and kills the daemon at a random moment (the next start clears the dead
mount). Between rounds the cache is damaged the ways a crash or a bad disk
damages it (a pack cut short inside a chunk, a flipped bit, bytes planted
over a chunk, an index that lost its tail mid-record, a stray file). Every
byte any reader ever gets is compared with the source: no wrong byte may be
served, before or after a restart.
The cost of verifying cache entries on read is measured and printed.

The disk-full test puts ``--root`` on a small tmpfs it mounts itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from als.fetch.cache import ChunkCache
from als.fetch.packs import MAGIC, RECORD_SIZE, Record, decode
from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support.store_process import StoreProcess, is_mounted

CHUNK = 64 << 10
KILL_CHUNK = 512 << 10  # bigger chunks: longer cache writes to kill the daemon in
KILL_CONFIG = """
[fetch]
background = true
background_step = 1048576
[registry]
read_timeout = 5.0
retries = 1
"""


@dataclass
class Tally:
    rounds: int = 0
    kills_mid_write: int = 0  # rounds whose kill left a temporary cache file behind
    damaged: int = 0  # cache entries damaged between rounds
    bytes_verified: int = 0
    wrong_bytes: int = 0
    read_errors: int = 0  # reads that failed because the daemon was killed under them
    errors: list = field(default_factory=list)


def make_image(registry, client, name: str, files: int, size: int,
               chunk: int = CHUNK) -> tuple[str, list, dict[str, bytes]]:
    rng = random.Random(name)
    layers, contents = [], {}
    for i in range(files):
        data = rng.randbytes(size)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo(f"file{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        layers.append(estargz_layer(io.BytesIO(buf.getvalue()), chunk_size=chunk, level=1))
        contents[f"file{i}"] = data
    ref = f"{registry.host}/crash/{name}:v1"
    push_image(client, parse_reference(ref), layers)
    return ref, layers, contents


def reader(store, ref, layers, contents, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Random reads until ``stop``; every byte compared with the source, errors counted."""
    rng = random.Random(seed)
    names = sorted(contents)
    while not stop.is_set():
        i = rng.randrange(len(names))
        data = contents[names[i]]
        path = store.layer_dir(ref, layers[i].digest) / "diff" / names[i]
        offset = rng.randrange(len(data))
        size = rng.choice([1, 4096, CHUNK, 3 * CHUNK])
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.read(size)
        except OSError:
            tally.read_errors += 1
            time.sleep(0.01)
            continue
        want = data[offset:offset + size]
        tally.bytes_verified += len(got)
        if got != want:
            tally.wrong_bytes += sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))
            tally.errors.append(f"{names[i]} at {offset}+{size}")


def pack_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "packs").glob("*.pack"))


def records(pack: Path) -> list[Record]:
    """The records a store would read from a pack's index (none if it is gone or unreadable)."""
    try:
        return decode(pack.with_suffix(".index").read_bytes(), pack.stat().st_size)
    except (OSError, ValueError):
        return []


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def damage(cache_dir: Path, rng: random.Random, tally: Tally) -> int:
    """Damage packs the ways crashes and disks do: a pack cut short inside a chunk, a flipped bit,
    other bytes planted over a chunk, an index's tail lost mid-record, a stray file. Returns the
    count of chunks damaged (none if the cache holds none)."""
    targets = [(p, r) for p in pack_files(cache_dir) for r in records(p)]
    before = tally.damaged
    rng.shuffle(targets)
    for kind, (p, r) in zip(("truncate", "flip", "plant", "index"), targets):
        if kind == "truncate":
            os.truncate(p, min(p.stat().st_size, r.offset + r.length // 2))
        elif kind == "flip":
            at = r.offset + rng.randrange(r.length)
            with open(p, "rb") as f:
                f.seek(at)
                byte = f.read(1) or b"\0"
            write_at(p, at, bytes([byte[0] ^ 0x40]))
        elif kind == "plant":
            write_at(p, r.offset, os.urandom(r.length))
        else:
            index = p.with_suffix(".index")
            os.truncate(index, rng.randrange(len(MAGIC), index.stat().st_size))
        tally.damaged += 1
    (cache_dir / "packs" / "stray.1.2").write_bytes(b"half a chunk")
    return tally.damaged - before


def mid_write(cache_dir: Path) -> bool:
    """A pack holds chunk bytes that no record names yet, or a record half written: the store is
    (frozen) between writing chunks and writing their records."""
    for p in pack_files(cache_dir):
        try:
            size, index_size = p.stat().st_size, p.with_suffix(".index").stat().st_size
        except OSError:
            continue
        named = max((r.offset + r.length for r in records(p)), default=0)
        if size > named or (index_size - len(MAGIC)) % RECORD_SIZE:
            return True
    return False


def aim_and_kill(store, cache_dir: Path, tries: int = 400) -> None:
    """SIGKILL the daemon, preferably in the middle of a cache write.

    Freeze it (SIGSTOP) at short random intervals and look for a pack
    caught between its chunks and their records; kill it while frozen as
    soon as one is, or after ``tries``.
    """
    pid = store.proc.pid
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        if mid_write(cache_dir):
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    store.kill()  # SIGKILL (a frozen process dies too): whatever it was fetching or writing is cut off


def drop_pages(store, ref, layers, contents) -> None:
    """Drop the files' pages from the kernel's cache, which a kept connection keeps across the
    kills: else later rounds' reads never reach the store, which then has nothing to fetch and
    no cache write to be killed in."""
    for name, layer in zip(sorted(contents), layers):
        fd = os.open(store.layer_dir(ref, layer.digest) / "diff" / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def forget_some(cache_dir: Path, rng: random.Random) -> None:
    """So that the next round has chunks to fetch and write again: whole packs, or an index's tail."""
    for p in pack_files(cache_dir):
        if rng.random() < 0.4:
            p.unlink()
            p.with_suffix(".index").unlink(missing_ok=True)
        elif rng.random() < 0.5 and records(p):
            os.truncate(p.with_suffix(".index"), len(MAGIC) + RECORD_SIZE * rng.randrange(len(records(p))))


def verify_cache(cache_dir: Path) -> int:
    """Hash every chunk the cache would serve, as a new store would open it; the count (all intact)."""
    cache = ChunkCache(cache_dir, memory_bytes=0)
    try:
        checked, removed = cache.verify()
    finally:
        cache.close()
    assert not removed, f"{removed} corrupt chunks left in the cache after every chunk was read"
    return checked


def verify_all(store, ref, layers, contents, tally: Tally) -> None:
    for (name, data), layer in zip(sorted(contents.items()), layers):
        got = (store.layer_dir(ref, layer.digest) / "diff" / name).read_bytes()
        tally.bytes_verified += len(got)
        assert got == data, f"{name}: wrong bytes after a restart"


def kill_rounds(registry, client, workdir: Path, registries_conf: Path, rounds: int, files: int, size: int,
                seed: int = 1, keep_connection: bool = True) -> Tally:
    """The body of the SIGKILL test, shared with the soak.

    With the connection kept (the default), the next store takes it over and
    the readers' reads wait for it: none may fail. Without, reads fail while
    the mount is dead and the next store clears it.
    """
    ref, layers, contents = make_image(registry, client, f"kill{seed}", files, size, KILL_CHUNK)
    tally = Tally()
    rng = random.Random(seed)
    config = KILL_CONFIG + f"[fuse]\nkeep_connection = {str(keep_connection).lower()}\n"
    store = StoreProcess(workdir, registries_conf=registries_conf, config=config, log_level="info")
    cache_dir = store.root / "cache"
    try:
        damage_due = False
        for r in range(rounds):
            store.start()
            drop_pages(store, ref, layers, contents)
            stop = threading.Event()
            threads = [threading.Thread(target=reader, args=(store, ref, layers, contents, stop, tally,
                                                              rng.random()), daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.02, 0.3))
            aim_and_kill(store, cache_dir)
            stop.set()
            if not keep_connection:
                for t in threads:
                    t.join(30)
                    assert not t.is_alive(), "a reader hung on the dead mount"
            assert is_mounted(store.mountpoint)  # the dead mount a crash leaves, or the kept one
            if mid_write(cache_dir):
                tally.kills_mid_write += 1
            forget_some(cache_dir, rng)  # so that the next round has chunks to fetch and write again
            damage_due = damage_due or r % 3 == 2
            if damage_due:  # after forgetting: the next start must meet every kind
                damage_due = not damage(cache_dir, rng, tally)
            if keep_connection:  # the readers wait for the next store, which takes the connection over
                store.start()
                for t in threads:
                    t.join(60)
                    assert not t.is_alive(), "a reader still waits after the next store took over"
                store.kill()
            tally.rounds += 1
        store.start()  # clears the dead mount (or takes it over), drops the leftovers, serves exactly the source
        verify_all(store, ref, layers, contents, tally)
        log = store.log()
        if keep_connection:  # the kernel kept its page cache across the take-overs: read it all through the store
            store.stop(signal.SIGINT)
            store.start()
            verify_all(store, ref, layers, contents, tally)
        if keep_connection:
            afresh = [line for line in log.splitlines() if any(
                w in line for w in ("mounting afresh", "does not answer", "cannot keep the FUSE"))]
            assert log.count("taking over the live FUSE connections") == rounds * 2, afresh
            assert "clearing the stale mount" not in log and tally.read_errors == 0
        else:
            assert "clearing the stale mount" in log
    finally:
        store.stop()
    assert not is_mounted(store.mountpoint)
    assert verify_cache(cache_dir)
    assert not tally.wrong_bytes, tally.errors[:5]
    return tally


def verify_cost(cache_dir: Path) -> str:
    """What hashing every chunk on read costs, measured on this cache (page cache warm)."""
    cache = ChunkCache(cache_dir, memory_bytes=0)
    try:
        digests = sorted({r.digest for p in pack_files(cache_dir) for r in records(p) if cache.contains(r.digest)})
        where = [cache.location(d) for d in digests]
        total = sum(length for _, _, length in where)
        files = {path: open(path, "rb") for path, _, _ in where}
        t0 = time.perf_counter()
        for path, offset, length in where:
            os.pread(files[path].fileno(), length, offset)
        raw = time.perf_counter() - t0
        for f in files.values():
            f.close()
        t0 = time.perf_counter()
        for d in digests:
            assert cache.get(d) is not None
        checked = time.perf_counter() - t0
    finally:
        cache.close()
    mib = total / 2**20
    return (f"verify on read: {len(digests)} chunks in {len(files)} packs, {mib:.1f} MiB: plain read "
            f"{mib / raw:.0f} MiB/s, read+sha256 {mib / checked:.0f} MiB/s "
            f"({(checked - raw) / len(digests) * 1e6:.0f} us per {total // len(digests) >> 10} KiB chunk)")


@pytest.mark.parametrize("keep_connection", [True, False], ids=["kept", "not-kept"])
def test_sigkill_during_fetches_and_cache_writes_never_serves_a_wrong_byte(
        registry, client, registries_conf, tmp_path, keep_connection):
    tally = kill_rounds(registry, client, tmp_path, registries_conf, rounds=8, files=3, size=8 << 20,
                        keep_connection=keep_connection)
    print(f"\nSIGKILL rounds: {tally.rounds}, kills that left a half-written entry: {tally.kills_mid_write}, "
          f"entries damaged: {tally.damaged}, bytes verified: {tally.bytes_verified}, "
          f"reads failed under a kill: {tally.read_errors}, wrong bytes: {tally.wrong_bytes}")
    print(verify_cost(tmp_path / "root" / "cache"))
    assert tally.damaged > 0 and tally.kills_mid_write > 0


# ---- the cache disk fills up -------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   timeout=30)
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        assert not is_mounted(path), f"could not unmount the test tmpfs on {path}"


def test_a_full_cache_disk_serves_from_memory_leaves_nothing_corrupt_and_recovers(
        registry, client, registries_conf, tmp_path):
    ref, layers, contents = make_image(registry, client, "full", files=2, size=32 * CHUNK)  # 2 x 2 MiB
    config = "[fetch]\nbackground = false\n[cache]\nmemory_bytes = 8388608\n"
    with tmpfs(tmp_path / "root", "1m") as root:
        store = StoreProcess(tmp_path, registries_conf=registries_conf, config=config)
        assert store.root == root
        try:
            store.start()
            first = contents["file0"]
            diff0 = store.layer_dir(ref, layers[0].digest) / "diff" / "file0"
            # Fill what is left, as another process on the same disk would.
            filler = root / "filler"
            # Unbuffered: a buffered file would try its unwritten rest again on close, and fail there.
            with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(bytes(64 << 10))
            assert diff0.read_bytes() == first  # served from memory: nothing could be cached
            assert "No space left on device" in store.log()
            # Less memory than the file: each read fetches again, still exact.
            store.stop()
            store.config_path.write_text("[fetch]\nbackground = false\n[cache]\nmemory_bytes = 0\n")
            store.start()
            for offset in range(0, len(first), 5 * CHUNK + 7):
                with open(diff0, "rb") as f:
                    f.seek(offset)
                    assert f.read(CHUNK) == first[offset:offset + CHUNK]
            # The disk frees up: caching works again without a restart.
            filler.unlink()
            second = contents["file1"]
            diff1 = store.layer_dir(ref, layers[1].digest) / "diff" / "file1"
            assert diff1.read_bytes()[:CHUNK] == second[:CHUNK]
        finally:
            store.stop()
        assert verify_cache(root / "cache"), "nothing was cached once the disk had room again"
        assert not mid_write(root / "cache"), "chunk bytes no record names were kept"
