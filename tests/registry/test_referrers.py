"""OCI 1.1 referrers (als/registry/referrers.py), published and listed three ways.

Debian's docker-registry (distribution 2.8.2) has no referrers API, so on it
the client keeps the spec's fallback tag (``sha256-<hex>``). The same
registry behind tests/support/referrersapi.py has the API (OCI-Subject,
``GET /v2/<name>/referrers/<digest>``, filters, pages), so the API path runs
against a real registry's storage too; hostile API answers come from there.
The in-memory registry of the fast tier lists referrers as a 1.1 registry
does, and runs the same scenario.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from als.errors import AuthError, NotFoundError, ReferrersError
from als.oci import OCI_EMPTY, OCI_INDEX, OCI_MANIFEST
from als.reference import Reference, parse_reference
from als.registry.referrers import (EMPTY, MAX_INDEX_SIZE, MAX_PAGES, VIA_API, VIA_TAG,
                                    Descriptor, artifact_manifest, referrers_tag)
from tests.support.httpfront import Front
from tests.support.memregistry import MemoryRegistry
from tests.support.referrersapi import ReferrersFront
from tests.support.regtest import fast_client, hermetic_env, insecure, push_image, sha, write_conf  # noqa: F401

INDEX_TYPE = "application/vnd.example.gzip-index.v1"
SIG_TYPE = "application/vnd.example.signature.v1"


def subject_of(client, ref: Reference, seed: int) -> Descriptor:
    image = push_image(client, ref, seed)
    return Descriptor(OCI_MANIFEST, image.digest, len(image.manifest))


def blob(client, ref: Reference, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
    client.push_blob(ref, data, sha(data), len(data))
    return Descriptor(media_type, sha(data), len(data))


def two_referrers(client, host: str, repo: str) -> tuple[Reference, Descriptor, list]:
    """Two referrers of one subject, listed whole and filtered; a subject, and a repository, with none.

    Each caller has its own ``repo``: the registry is shared by the module."""
    ref = parse_reference(f"{host}/{repo}:v1")
    subject = subject_of(client, ref, seed=1)
    lonely = subject_of(client, parse_reference(f"{host}/{repo}:v2"), seed=2)
    index = blob(client, ref, b"a seekable index", INDEX_TYPE + "+json")
    sig = blob(client, ref, b"a signature")
    a = client.publish_referrer(ref, subject, INDEX_TYPE, [index], {"org.example.layer": "0"})
    b = client.publish_referrer(ref, subject, SIG_TYPE, [sig])
    assert a.descriptor == Descriptor(OCI_MANIFEST, a.descriptor.digest, a.descriptor.size, INDEX_TYPE,
                                      {"org.example.layer": "0"})
    assert client.list_referrers(ref, subject.digest) == [a.descriptor, b.descriptor]
    assert client.list_referrers(ref, subject.digest, SIG_TYPE) == [b.descriptor]
    assert client.list_referrers(ref, subject.digest, "application/vnd.example.none") == []
    assert client.list_referrers(ref, lonely.digest) == []
    assert client.list_referrers(parse_reference(f"{host}/ns/nothing-here:v1"), subject.digest) == []
    return ref, subject, [a, b]


@contextlib.contextmanager
def client_for(tmp_path, *hosts: str):
    with fast_client(write_conf(tmp_path, insecure(*hosts))) as client:
        yield client


# ---------------------------------------------------------------- the tag fallback (docker-registry)
def test_tag_fallback_on_a_registry_without_the_api(registry, tmp_path):
    with client_for(tmp_path, registry.host) as client:
        ref, subject, published = two_referrers(client, registry.host, "ns/fallback")
        tag = referrers_tag(subject.digest)
        assert [p.via for p in published] == [VIA_TAG, VIA_TAG]
        assert {p.tag for p in published} == {tag} and tag == "sha256-" + subject.digest[7:]
        index = client.get_manifest(ref, tag)
        assert index.media_type == OCI_INDEX
        doc = json.loads(index.data)
        assert doc["manifests"] == [p.descriptor.to_json() for p in published]
        assert doc["manifests"][0]["artifactType"] == INDEX_TYPE
        assert doc["manifests"][0]["annotations"] == {"org.example.layer": "0"}
        # Published again: listed once (the registry's stored tag is unchanged).
        again = client.publish_referrer(ref, subject, SIG_TYPE, [Descriptor(
            "application/octet-stream", sha(b"a signature"), len(b"a signature"))])
        assert again.descriptor == published[1].descriptor
        assert client.get_manifest(ref, tag).digest == index.digest


def test_the_artifact_manifest_as_pushed(registry, tmp_path):
    with client_for(tmp_path, registry.host) as client:
        ref = parse_reference(f"{registry.host}/ns/shape:v1")
        subject = subject_of(client, ref, seed=3)
        layer = blob(client, ref, b"index bytes", INDEX_TYPE)
        pub = client.publish_referrer(ref, subject, INDEX_TYPE, [layer], {"k": "v"})
        got = client.get_manifest(ref, pub.descriptor.digest)
        assert got.media_type == OCI_MANIFEST and len(got.data) == pub.descriptor.size
        doc = json.loads(got.data)
        assert doc == {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": INDEX_TYPE,
                       "config": {"mediaType": OCI_EMPTY, "digest": sha(b"{}"), "size": 2},
                       "layers": [layer.to_json()],
                       "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.size},
                       "annotations": {"k": "v"}}
        assert client.get_blob(ref, EMPTY.digest, 16) == b"{}"


def test_a_fallback_tag_that_is_not_an_index(registry, tmp_path):
    """Someone else's manifest under the tag: no referrers when listing; publishing refuses and
    leaves it alone."""
    with client_for(tmp_path, registry.host) as client:
        ref = parse_reference(f"{registry.host}/ns/taken:v1")
        subject = subject_of(client, ref, seed=4)
        tag = referrers_tag(subject.digest)
        squatter = push_image(client, parse_reference(f"{registry.host}/ns/taken:{tag}"), seed=5)
        assert client.list_referrers(ref, subject.digest) == []
        with pytest.raises(ReferrersError, match="not an OCI index"):
            client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig")])
        assert client.get_manifest(ref, tag).digest == squatter.digest


def test_duplicates_in_the_fallback_tag_are_dropped(registry, tmp_path):
    """A tag some other client wrote with an entry twice: rewritten with each digest once, in order."""
    with client_for(tmp_path, registry.host) as client:
        ref = parse_reference(f"{registry.host}/ns/twice:v1")
        subject = subject_of(client, ref, seed=8)
        first = client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig 1")]).descriptor
        tag = referrers_tag(subject.digest)
        client.put_manifest(ref, _index([first.to_json(), first.to_json()]), OCI_INDEX, tag)
        second = client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig 2")]).descriptor
        assert json.loads(client.get_manifest(ref, tag).data)["manifests"] == [first.to_json(), second.to_json()]


def test_publish_stops_when_the_fallback_tag_cannot_be_read(registry, tmp_path):
    """Only a 404 means "no referrers yet": a refused read must not become an overwrite."""
    def refuse_tag(seen):
        return (403, {}, b"") if seen.method == "GET" and "/manifests/sha256-" in seen.path else None

    with Front(registry.host, hook=refuse_tag) as front, client_for(tmp_path, front.host, registry.host) as client:
        ref = parse_reference(f"{front.host}/ns/refused:v1")
        subject = subject_of(client, ref, seed=9)
        with pytest.raises(AuthError):
            client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig")])
        assert not front.seen(lambda s: s.method == "PUT" and "/manifests/sha256-" in s.path)


def test_a_registry_without_the_api_is_asked_for_it_once(registry, tmp_path):
    """A store lists the referrers of plain gzip images on every resolution: once a registry has said
    it has no such route (a bare 404, not a registry error), only the fallback tag is read."""
    with Front(registry.host) as front, client_for(tmp_path, front.host) as client:
        ref = parse_reference(f"{front.host}/ns/once:v1")
        subject = subject_of(client, ref, seed=11)
        for _ in range(3):
            assert client.list_referrers(ref, subject.digest) == []
        assert len(front.seen(lambda s: "/referrers/" in s.path)) == 1
        assert len(front.seen(lambda s: "/manifests/sha256-" in s.path)) == 3


def test_a_registry_error_from_the_api_route_is_not_taken_for_no_api(registry, tmp_path):
    """A JSON 404 (a repository the API does not know) says nothing about the route: asked each time."""
    def unknown(seen):
        if "/referrers/" in seen.path:
            return (404, {"Content-Type": "application/json"},
                    b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}')
        return None

    with Front(registry.host, hook=unknown) as front, client_for(tmp_path, front.host) as client:
        ref = parse_reference(f"{front.host}/ns/unknown:v1")
        subject = subject_of(client, ref, seed=12)
        for _ in range(2):
            assert client.list_referrers(ref, subject.digest) == []
        assert len(front.seen(lambda s: "/referrers/" in s.path)) == 2


# ---------------------------------------------------------------- the referrers API (front on docker-registry)
def test_referrers_api(registry, tmp_path):
    with ReferrersFront(registry.host) as api, client_for(tmp_path, api.host) as client:
        ref, subject, published = two_referrers(client, api.host, "ns/api")
        assert [p.via for p in published] == [VIA_API, VIA_API]
        with pytest.raises(NotFoundError):  # no fallback tag written
            client.get_manifest(ref, referrers_tag(subject.digest))
        probes = [s for s in api.referrer_requests() if "artifactType" not in s.path]
        assert len(probes) == 3  # the three unfiltered lists; OCI-Subject spared a probe per publish
        assert any("artifactType=application%2Fvnd.example.signature.v1" in s.path
                   for s in api.referrer_requests())


def test_referrers_api_without_oci_subject(registry, tmp_path):
    """A registry that lists referrers but does not say so on the PUT: the client asks, finds the API, writes no tag."""
    with ReferrersFront(registry.host, oci_subject=False) as api, client_for(tmp_path, api.host) as client:
        ref = parse_reference(f"{api.host}/ns/quiet:v1")
        subject = subject_of(client, ref, seed=6)
        pub = client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig")])
        assert pub.via == VIA_API and pub.tag is None
        assert len(api.referrer_requests()) == 1
        with pytest.raises(NotFoundError):
            client.get_manifest(ref, referrers_tag(subject.digest))
        assert client.list_referrers(ref, subject.digest) == [pub.descriptor]


def test_referrers_api_that_ignores_the_filter(registry, tmp_path):
    with ReferrersFront(registry.host, apply_filter=False) as api, client_for(tmp_path, api.host) as client:
        ref, subject, (a, b) = two_referrers(client, api.host, "ns/unfiltered")
        assert client.list_referrers(ref, subject.digest, INDEX_TYPE) == [a.descriptor]


def test_referrers_api_in_pages(registry, tmp_path):
    with ReferrersFront(registry.host, page_size=1) as api, client_for(tmp_path, api.host) as client:
        ref = parse_reference(f"{api.host}/ns/paged:v1")
        subject = subject_of(client, ref, seed=7)
        published = [client.publish_referrer(ref, subject, SIG_TYPE, [blob(client, ref, b"sig %d" % i)])
                     for i in range(3)]
        mark = len(api.referrer_requests())
        assert client.list_referrers(ref, subject.digest) == [p.descriptor for p in published]
        assert len(api.referrer_requests()) - mark == 3


def _index(manifests) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


GOOD = {"mediaType": OCI_MANIFEST, "digest": sha(b"x"), "size": 1, "artifactType": SIG_TYPE}
HOSTILE = {
    "not JSON": (200, {"Content-Type": OCI_INDEX}, b"<html>oops</html>", "not JSON"),
    "wrong media type": (200, {"Content-Type": "application/json"}, _index([GOOD]), "not an OCI index"),
    "huge": (200, {"Content-Type": OCI_INDEX}, b" " * (MAX_INDEX_SIZE + 1), "bytes allowed"),
    "no manifests": (200, {"Content-Type": OCI_INDEX}, b'{"schemaVersion": 2, "manifests": {}}', "no list"),
    "bad digest": (200, {"Content-Type": OCI_INDEX}, _index([dict(GOOD, digest="sha256:../../x")]),
                   "invalid digest"),
    "negative size": (200, {"Content-Type": OCI_INDEX}, _index([dict(GOOD, size=-1)]), "invalid size"),
    "endless pages": (200, {"Content-Type": OCI_INDEX, "Link": '</v2/ns/app/referrers/x>; rel="next"'},
                      _index([GOOD]), f"more than {MAX_PAGES} pages"),
    "next page elsewhere": (200, {"Content-Type": OCI_INDEX, "Link": '<http://10.0.0.1/x>; rel="next"'},
                            _index([GOOD]), "another host"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_referrers_api_answers(case, registry, tmp_path):
    *answer, message = HOSTILE[case]
    with ReferrersFront(registry.host) as api, client_for(tmp_path, api.host) as client:
        api.answer = tuple(answer)
        with pytest.raises(ReferrersError, match=message):
            client.list_referrers(parse_reference(f"{api.host}/ns/app:v1"), sha(b"subject"))
        assert len(api.referrer_requests()) == (MAX_PAGES if case == "endless pages" else 1)


# ---------------------------------------------------------------- the in-memory registry (fast tier)
def test_in_memory_registry_lists_referrers():
    mem = MemoryRegistry()
    _, _, published = two_referrers(mem, "mem.example", "ns/app")
    assert [p.via for p in published] == [VIA_API, VIA_API]


# ---------------------------------------------------------------- the tag's name, the manifest's shape
@pytest.mark.parametrize("digest, tag", [
    ("sha256:" + "a" * 64, "sha256-" + "a" * 64),
    ("sha512:" + "b" * 128, "sha512-" + "b" * 64),
    ("test+algorithm+using+algorithm+separators+and+lots+of+characters+to+excercise+overall+truncation:"
     "alsoSome=InTheEncodedSectionToShowHyphenReplacementAndLotsAndLotsOfCharactersToExcerciseEncodedTruncation",
     "test-algorithm-using-algorithm-s-alsoSome-InTheEncodedSectionToShowHyphenReplacementAndLotsAndLot"),
])
def test_referrers_tag(digest, tag):
    assert referrers_tag(digest) == tag


def test_artifact_manifest_without_layers_or_type():
    subject = Descriptor(OCI_MANIFEST, sha(b"m"), 1, SIG_TYPE, {"dropped": "from the subject"})
    doc = json.loads(artifact_manifest(subject, SIG_TYPE, []))
    assert doc["layers"] == [EMPTY.to_json()] and doc["config"] == EMPTY.to_json()
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": sha(b"m"), "size": 1}
    assert "annotations" not in doc
    with pytest.raises(ValueError):
        artifact_manifest(subject, "", [])
