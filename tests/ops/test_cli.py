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


def test_serve_loads_no_character_set_detector(tmp_path):
    """requests would import one (3.5 MiB resident) for Response.text, which the store never reads."""
    s = StoreProcess(tmp_path)
    s.start()
    try:
        maps = open(f"/proc/{s.proc.pid}/maps").read()
        assert "python" in maps  # the process is ours and its maps were read
        assert "charset_normalizer" not in maps and "chardet" not in maps
    finally:
        s.stop()


def test_without_a_detector_requests_still_reads_text():
    code = ("from als.ops.lean import without_charset_detection; without_charset_detection()\n"
            "import sys, requests\n"
            "assert not [m for m in sys.modules if m.startswith(('charset_normalizer', 'chardet'))"
            " and sys.modules[m] is not None]\n"
            "r = requests.models.Response(); r._content = 'caf\\u00e9'.encode(); r.encoding = None\n"
            "print(r.text)\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "caf\u00e9\n"
