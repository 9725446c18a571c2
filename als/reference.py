"""Image references, normalised the way Docker and Podman spell them.

Podman names the image in the Additional Layer Store path by its fully
qualified reference (``docker.io/library/alpine:3.18``), and registries.conf
prefixes and auth.json keys are matched against that same spelling, so every
reference als handles is normalised once, here, before anything else looks
at it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})

# The docker reference grammar (distribution/reference), written out here.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]*)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*", re.ASCII)
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?", re.ASCII)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_NAME_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference; ``str()`` gives Podman's spelling."""

    registry: str  # host[:port], "docker.io" for Docker Hub
    repository: str  # path at the registry, "library/alpine" for official images
    tag: str | None
    digest: str | None  # "sha256:<64 hex>"

    @property
    def name(self) -> str:
        """``registry/repository``: what registries.conf prefixes match against."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(s: str) -> Reference:
    """Parse and normalise ``s``; raise ValueError naming what is wrong.

    ``alpine`` becomes ``docker.io/library/alpine:latest``; a reference with a
    digest and no tag stays without a tag, as Podman keeps it.
    """
    if not isinstance(s, str) or not s:
        raise ValueError("image reference is empty")
    if s != s.strip() or any(c.isspace() for c in s):
        raise ValueError(f"image reference {s!r} contains white space")
    rest = s
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ValueError(
                f"image reference {s!r}: digest {digest!r} is not sha256:<64 lowercase hex digits>")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise ValueError(
                f"image reference {s!r}: tag {tag!r} is invalid "
                "(letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')")
    if not rest:
        raise ValueError(f"image reference {s!r} has no repository name")

    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
        if not _HOST.fullmatch(registry):
            raise ValueError(f"image reference {s!r}: registry host {registry!r} is invalid")
    else:
        registry, repository = DOCKER_HUB, rest
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"

    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise ValueError(
                f"image reference {s!r}: repository component {component!r} is invalid "
                "(lowercase letters and digits, separated by '.', '_', '__' or dashes)")
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise ValueError(f"image reference {s!r}: name is longer than {_NAME_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
