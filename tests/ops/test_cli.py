"""The command line and the daemon's life cycle, with real mounts and signals."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from tests.support.store_process import REPO, StoreProcess, is_mounted


def als(*args, **kw):
    return subprocess.run([sys.executable, "-m", "als", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, **kw)


def test_help_describes_every_option():
    top = als("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    serve = als("serve", "--help")
    assert serve.returncode == 0
    for word in ("MOUNTPOINT", "--root", "--config", "--log-level", "additionallayerstores", "SIGTERM"):
        assert word in serve.stdout, word


def test_a_missing_named_config_is_an_error(tmp_path):
    r = als("serve", "--config", str(tmp_path / "absent.toml"), "--root", str(tmp_path / "r"), str(tmp_path / "m"))
    assert r.returncode == 1 and "absent.toml does not exist" in r.stderr
    assert not is_mounted(tmp_path / "m")


def test_a_bad_config_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[resolve]\ntimout = 3\n")
    r = als("serve", "--config", str(cfg), "--root", str(tmp_path / "r"), str(tmp_path / "m"))
    assert r.returncode == 1 and "unknown key resolve.timout" in r.stderr


def test_sigterm_and_sigint_unmount_and_exit_zero(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        (tmp_path / sig.name).mkdir()
        s = StoreProcess(tmp_path / sig.name)
        s.start()
        try:
            assert is_mounted(s.mountpoint)  # created although it did not exist
            assert s.stop(sig) == 0
            assert not is_mounted(s.mountpoint)
        finally:
            s.stop()


def test_a_stale_mount_from_a_killed_store_is_cleared_at_start(tmp_path):
    s = StoreProcess(tmp_path, config="[fuse]\nkeep_connection = false\n")  # kept, it would live on
    s.start()
    try:
        s.kill()
        assert is_mounted(s.mountpoint)
        with pytest.raises(OSError) as e:
            os.listdir(s.mountpoint)
        assert e.value.errno == errno.ENOTCONN
        s.start()
        assert os.path.isdir(s.mountpoint) and "clearing the stale mount" in s.log()
    finally:
        s.stop()


def test_cache_stats_prune_verify(tmp_path):
    from als.fetch.cache import ChunkCache
    from als.digest import sha256_digest
    cache = ChunkCache(tmp_path / "cache")
    for i in range(3):
        cache.put(sha256_digest(bytes([i]) * 100), bytes([i]) * 100)
    assert cache.close()  # put() leaves the writing to a thread; the command reads the packs
    pack = next((tmp_path / "cache" / "packs").glob("*.pack"))
    offset = 100  # the second chunk
    r = als("cache", "stats", "--root", str(tmp_path), "--json")
    assert r.returncode == 0 and '"entries": 3' in r.stdout and '"bytes": 300' in r.stdout
    with open(pack, "r+b") as f:  # one chunk damaged: verify keeps the other two
        f.seek(offset)
        f.write(b"bad")
    r = als("cache", "verify", "--root", str(tmp_path), "--json")
    assert '"checked": 3' in r.stdout and '"removed": 1' in r.stdout
    r = als("cache", "prune", "--root", str(tmp_path))
    assert r.returncode == 0 and "freed bytes: 200" in r.stdout and "entries: 0" in r.stdout
    assert als("cache", "stats", "--root", str(tmp_path / "nope")).returncode == 1
