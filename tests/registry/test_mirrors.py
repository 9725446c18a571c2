"""registries.conf v2 against real registries: mirrors, pull-from-mirror, wildcards, drop-ins.

The mirror is a second docker-registry in pull-through-cache mode
(``proxy.remoteurl`` = the origin), as a site mirror is deployed. Who served
what is read from each registry's own access log: range reads by the
client show up as 206 answers, while the mirror's own fetches from the
origin are whole-blob 200s.
"""

from __future__ import annotations

import logging

import pytest

from als.errors import BlockedError
from als.reference import parse_reference
from tests.support.registry import RegistryProcess
from tests.support.regtest import (mirrored, fast_client, hermetic_env, insecure, push_image,  # noqa: F401
                                   requests_seen, settled_lines, sha, wait_accesses, write_conf)


@pytest.fixture
def origin_and_cache():
    """An origin registry and a pull-through cache of it."""
    origin = RegistryProcess().start()
    cache = None
    try:
        cache = RegistryProcess(extra={"proxy": {"remoteurl": origin.url}}).start()
        yield origin, cache
    finally:
        if cache is not None:
            cache.cleanup()
        origin.cleanup()


def mirror_conf(tmp_path, origin, cache, pull_from_mirror: str = "all"):
    return write_conf(tmp_path, mirrored(origin.host, cache.host, pull_from_mirror))


def gets(reg, mark, n=1):
    return [("manifests" if "/manifests/" in a.uri else "blobs", a.status)
            for a in wait_accesses(reg, mark, lambda a: a.method == "GET", n=n)]


def test_pull_through_cache_mirror_then_origin_when_it_is_down(origin_and_cache, tmp_path, caplog):
    origin, cache = origin_and_cache
    conf = mirror_conf(tmp_path, origin, cache)
    ref = parse_reference(f"{origin.host}/team/app:v1")
    caplog.set_level(logging.INFO, logger="als.registry")
    with fast_client(conf) as c:
        image = push_image(c, ref)  # pushes go to the origin, never to a mirror
        d = sha(image.layer)
        c_lines, o_mark = settled_lines(cache), origin.mark()
        assert c.get_manifest(ref).digest == image.digest
        assert c.read_range(ref, d, 100, 200) == image.layer[100:200]
        assert c.read_range(ref, d, 5000, 5100) == image.layer[5000:5100]
        # we talked to the cache only; it fetched from the origin on our behalf
        blob = f"/v2/team/app/blobs/{d}"
        assert requests_seen(cache, c_lines, n=3) == [
            ("GET", "/v2/team/app/manifests/v1"), ("GET", blob), ("GET", blob)]
        assert [a for a in origin.accesses_since(o_mark) if a.status == 206] == []

        cache.stop()
        o_mark = origin.mark()
        assert c.read_range(ref, d, 9000, 9100) == image.layer[9000:9100]
        assert c.get_manifest(ref).data == image.manifest
        assert gets(origin, o_mark, n=2) == [("blobs", 206), ("manifests", 200)]
    assert f"trying registry {origin.host} instead" in caplog.text


@pytest.mark.parametrize("mode, by_digest_uses_mirror, by_tag_uses_mirror", [
    ("all", True, True), ("digest-only", True, False), ("tag-only", False, True)])
def test_pull_from_mirror(origin_and_cache, tmp_path, mode, by_digest_uses_mirror,
                          by_tag_uses_mirror):
    origin, cache = origin_and_cache
    conf = mirror_conf(tmp_path, origin, cache, mode)
    tagged = parse_reference(f"{origin.host}/app:v1")
    with fast_client(conf) as c:
        image = push_image(c, tagged)
    pinned = parse_reference(f"{origin.host}/app@{image.digest}")
    blob = f"/v2/app/blobs/{sha(image.layer)}"
    for ref, via_mirror in [(tagged, by_tag_uses_mirror), (pinned, by_digest_uses_mirror)]:
        c_lines, o_mark = settled_lines(cache), origin.mark()
        manifest = f"/v2/app/manifests/{ref.tag or ref.digest}"
        with fast_client(conf) as c:
            assert c.get_manifest(ref).digest == image.digest
            # (a pull-through cache answers a range of a blob it has not cached yet with
            # the whole blob, 200: a real registry ignoring Range, read correctly)
            assert c.read_range(ref, sha(image.layer), 0, 64) == image.layer[:64]
        if via_mirror:
            assert sorted(requests_seen(cache, c_lines, n=2)) == [("GET", blob), ("GET", manifest)], ref
            assert not [a for a in origin.accesses_since(o_mark) if a.status == 206], ref
        else:
            assert gets(origin, o_mark, n=2) == [("manifests", 200), ("blobs", 206)], ref
            assert requests_seen(cache, c_lines, timeout=0.5) == [], ref


def test_wildcard_prefix_with_a_mirror(tmp_path):
    """`*.example.test` matches any subdomain, and its mirror serves the image.

    The origin name never resolves: every byte must come from the mirror."""
    with RegistryProcess() as mirror:
        conf = write_conf(tmp_path, f'''
[[registry]]
prefix = "*.example.test"
[[registry.mirror]]
location = "{mirror.host}/cache"
insecure = true
''')
        with fast_client(write_conf(tmp_path, insecure(mirror.host))) as c:
            image = push_image(c, parse_reference(f"{mirror.host}/cache/team/app:v1"))
        with fast_client(conf) as c:
            for name in ("a.example.test", "b.c.example.test:5000"):
                ref = parse_reference(f"{name}/team/app:v1")
                assert c.get_manifest(ref).digest == image.digest
                assert c.read_range(ref, sha(image.layer), 3, 30) == image.layer[3:30]
        assert len(mirror.accesses()) > 0
        endpoints = conf.endpoints(parse_reference("example.test/team/app:v1"))
        assert [e.host for e, _ in endpoints] == ["example.test"]  # no subdomain: no match


def test_dropins_add_a_mirror_and_block_a_namespace(origin_and_cache, tmp_path, monkeypatch):
    origin, cache = origin_and_cache
    main = tmp_path / "registries.conf"
    main.write_text(insecure(origin.host))
    dropins = tmp_path / "registries.conf.d"
    dropins.mkdir()
    (dropins / "10-mirror.conf").write_text(mirrored(origin.host, cache.host))
    (dropins / "20-block.conf").write_text(f'''
[[registry]]
prefix = "{origin.host}/quarantine"
location = "{origin.host}/quarantine"
blocked = true
''')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(main))
    from als.registry.sysregistries import RegistriesConf
    conf = RegistriesConf.load()
    assert [p.name for p in conf.files] == ["registries.conf", "10-mirror.conf", "20-block.conf"]
    ok, bad = parse_reference(f"{origin.host}/ok/app:v1"), parse_reference(f"{origin.host}/quarantine/app:v1")
    with fast_client(write_conf(tmp_path / "..", insecure(origin.host))) as c:
        image = push_image(c, ok)
        push_image(c, bad)
    c_lines = settled_lines(cache)
    with fast_client(conf) as c:
        assert c.read_range(ok, sha(image.layer), 0, 10) == image.layer[:10]
        assert requests_seen(cache, c_lines) == [("GET", f"/v2/ok/app/blobs/{sha(image.layer)}")]
        with pytest.raises(BlockedError, match="blocked by registry prefix .*20-block.conf"):
            c.get_manifest(bad)
