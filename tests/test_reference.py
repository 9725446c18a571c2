"""Image reference parsing and normalisation (Docker/Podman spelling)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from als.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repository, tag, digest, normal", [
    ("alpine", "docker.io", "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("alpine:3.18", "docker.io", "library/alpine", "3.18", None, "docker.io/library/alpine:3.18"),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None,
     "docker.io/library/alpine:latest"),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", None,
     "docker.io/library/alpine:latest"),
    ("docker.io/library/alpine:3.18", "docker.io", "library/alpine", "3.18", None,
     "docker.io/library/alpine:3.18"),
    ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
    ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None, "localhost:5000/x:latest"),
    ("127.0.0.1:5000/a/b:tag", "127.0.0.1:5000", "a/b", "tag", None, "127.0.0.1:5000/a/b:tag"),
    ("127.0.0.1:5000/app:esgz", "127.0.0.1:5000", "app", "esgz", None, "127.0.0.1:5000/app:esgz"),
    ("quay.io/org/sub/repo", "quay.io", "org/sub/repo", "latest", None,
     "quay.io/org/sub/repo:latest"),
    (f"x@{D}", "docker.io", "library/x", None, D, f"docker.io/library/x@{D}"),
    (f"host.example/repo@{D}", "host.example", "repo", None, D, f"host.example/repo@{D}"),
    (f"x:tag@{D}", "docker.io", "library/x", "tag", D, f"docker.io/library/x:tag@{D}"),
    (f"localhost:5000/a/b:v1@{D}", "localhost:5000", "a/b", "v1", D,
     f"localhost:5000/a/b:v1@{D}"),
    ("my-registry.local:443/a_b/c__d/e-f/g.h---i", "my-registry.local:443", "a_b/c__d/e-f/g.h---i",
     "latest", None, "my-registry.local:443/a_b/c__d/e-f/g.h---i:latest"),
    ("[::1]:5000/app:v1", "[::1]:5000", "app", "v1", None, "[::1]:5000/app:v1"),
    ("app:V1_x.y-z", "docker.io", "library/app", "V1_x.y-z", None,
     "docker.io/library/app:V1_x.y-z"),
])
def test_parse_and_normalise(text, registry, repository, tag, digest, normal):
    ref = parse_reference(text)
    assert ref == Reference(registry=registry, repository=repository, tag=tag, digest=digest)
    assert str(ref) == normal
    assert parse_reference(str(ref)) == ref  # the normalised form is a fixed point


def test_name_and_reference_properties():
    ref = parse_reference(f"127.0.0.1:5000/app:v1@{D}")
    assert ref.name == "127.0.0.1:5000/app"
    assert ref.reference == D  # a pinned digest wins over the tag for fetching
    assert parse_reference("app:v1").reference == "v1"


def test_frozen():
    ref = parse_reference("alpine")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("Alpine", "component 'Alpine'"),
    ("docker.io/Library/alpine", "component 'Library'"),
    ("alpine:", "tag ''"),
    ("alpine:-x", "tag '-x'"),
    ("alpine:" + "a" * 129, "tag"),
    ("alpine@sha256:abc", "digest"),
    ("alpine@md5:" + "a" * 32, "digest"),
    ("alpine@sha256:" + "AB" * 32, "digest"),
    ("a//b", "component ''"),
    ("a/b/", "component ''"),
    ("/a", "component ''"),
    ("alpine ", "white space"),
    ("al pine", "white space"),
    ("a-/b", "component 'a-'"),
    ("_a", "component '_a'"),
    ("a___b", "component 'a___b'"),
    ("bad_host.example/app", "registry host"),
    ("-bad.example/app", "registry host"),
    ("example.com:port/app", "registry host"),
    ("example.com/" + "a" * 260, "longer than 255"),
    (":tag", "no repository"),
    ("@" + D, "no repository"),
])
def test_invalid(text, words):
    with pytest.raises(ValueError) as exc:
        parse_reference(text)
    assert words in str(exc.value)


_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,5}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_host = st.sampled_from(["quay.io", "localhost:5000", "127.0.0.1:5000", "reg.example.com"])


@given(_host, st.lists(_component, min_size=1, max_size=3), st.one_of(st.none(), _tag),
       st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)))
def test_round_trip(host, components, tag, digest):
    text = f"{host}/{'/'.join(components)}"
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    ref = parse_reference(text)
    assert ref.registry == host
    assert ref.repository == "/".join(components)
    assert ref.digest == digest
    assert ref.tag == (tag if tag or digest else "latest")
    assert str(ref) == (text if tag or digest else text + ":latest")
