"""containers-registries.conf(5), read the way Podman reads it.

Podman decides from these files which host really serves an image (mirrors,
``location`` rewrites), whether TLS is optional (``insecure``) and whether the
pull is allowed at all (``blocked``). The store must reach the same hosts with
the same rules, or lazily pulled layers would come from somewhere Podman
itself would never have pulled from.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BlockedError, ConfigError
from ..reference import DOCKER_HUB, Reference

log = logging.getLogger("als.registry")

SYSTEM_CONF = Path("/etc/containers/registries.conf")
USER_CONF = Path("~/.config/containers/registries.conf")
ENV_CONF = "CONTAINERS_REGISTRIES_CONF"
DOCKER_HUB_HOST = "registry-1.docker.io"

_PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror",
                  "mirror-by-digest-only"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}
_TOP_KEYS = {"registry", "registries", "unqualified-search-registries", "short-name-mode",
             "aliases", "credential-helpers", "additional-layer-store-auth-helper"}
# host[:port][/path] with nothing else; "*.host" only as a whole prefix.
_LOCATION = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9.\-:\[\]]*(?:/[a-z0-9._\-]+)*(?::[\w][\w.-]*)?"
                       r"(?:@sha256:[0-9a-f]{64})?", re.ASCII)
_WILDCARD = re.compile(r"\*\.[A-Za-z0-9][A-Za-z0-9.\-]*", re.ASCII)


@dataclass
class Endpoint:
    """One host to send registry API requests to, and how."""

    host: str  # host[:port] as used in URLs
    path_prefix: str  # repository prefix at this host ("" when not rewritten)
    insecure: bool  # plain HTTP allowed and TLS not verified
    is_mirror: bool


@dataclass
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # "all", "digest-only" or "tag-only"


@dataclass
class RegistryEntry:
    """One ``[[registry]]`` table (or a v1 list item translated into one)."""

    prefix: str
    location: str  # "" only with a wildcard prefix: no rewrite
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: list[Mirror] = field(default_factory=list)
    source: str = ""  # the file it came from, for messages

    @property
    def wildcard(self) -> bool:
        return self.prefix.startswith("*.")


@dataclass
class RegistriesConf:
    """The merged registries.conf files; answers "where do I pull this from"."""

    registries: list[RegistryEntry] = field(default_factory=list)
    unqualified_search_registries: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the files actually read
    # ``credential-helpers``: None when no file sets it (containers/image's
    # default, ["containers-auth.json"], applies); the last file setting it wins.
    credential_helpers: list[str] | None = None

    @classmethod
    def load(cls, path: str | None = None) -> "RegistriesConf":
        """Read ``path`` (or Podman's default files) plus its drop-in directory.

        With no ``path``: ``$CONTAINERS_REGISTRIES_CONF`` if set, else the
        per-user ``~/.config/containers/registries.conf`` if it exists (as
        Podman does), else ``/etc/containers/registries.conf``. Drop-ins are
        ``*.conf`` in the ``registries.conf.d`` directory beside the main
        file, in lexical order; for the system file, the per-user drop-in
        directory follows the system one, as with Podman.
        """
        if path is None:
            path = os.environ.get(ENV_CONF) or None
        dirs: list[Path] = []
        if path is not None:
            main = Path(path)
            dirs.append(main.parent / "registries.conf.d")
        else:
            user = USER_CONF.expanduser()
            if user.exists():
                main = user
                dirs.append(user.parent / "registries.conf.d")
            else:
                main = SYSTEM_CONF
                dirs += [SYSTEM_CONF.parent / "registries.conf.d",
                         user.parent / "registries.conf.d"]
        files = [main]
        for d in dirs:
            try:
                files += sorted(p for p in d.glob("*.conf") if p.is_file())
            except OSError:
                continue
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: list[Path]) -> "RegistriesConf":
        """Merge ``files`` in order; a later ``[[registry]]`` replaces an earlier same prefix."""
        by_prefix: dict[str, RegistryEntry] = {}
        search: list[str] = []
        read: list[Path] = []
        helpers: list[str] | None = None
        for f in files:
            data = _read_toml(Path(f))
            if data is None:
                continue
            read.append(Path(f))
            entries, file_search = _entries_from(data, str(f))
            file_helpers = _credential_helpers(data, str(f))
            if file_helpers is not None:
                helpers = file_helpers
            for e in entries:
                by_prefix.pop(e.prefix, None)  # re-insert: keep file order for ties
                by_prefix[e.prefix] = e
            if file_search is not None:
                search = file_search
        return cls(registries=list(by_prefix.values()),
                   unqualified_search_registries=search, files=read, credential_helpers=helpers)

    @classmethod
    def from_string(cls, text: str, source: str = "<string>") -> "RegistriesConf":
        """Parse one document; for tests and for config given inline."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        entries, search = _entries_from(data, source)
        return cls(registries=entries, unqualified_search_registries=search or [],
                   credential_helpers=_credential_helpers(data, source))

    def find(self, ref: Reference) -> tuple[RegistryEntry, str] | None:
        """The entry with the longest matching prefix, and the part of the name it matched."""
        best: tuple[int, int, RegistryEntry, str] | None = None
        for e in self.registries:
            matched = _match(e.prefix, ref)
            if matched is None:
                continue
            rank = (len(matched), 0 if e.wildcard else 1)
            if best is None or rank > best[:2]:
                best = (rank[0], rank[1], e, matched)
        return None if best is None else (best[2], best[3])

    def endpoints(self, ref: Reference) -> list[tuple[Endpoint, str]]:
        """(endpoint, repository at that endpoint) pairs to try: mirrors first, then the primary.

        Raises BlockedError if the matching entry says ``blocked = true``.
        """
        found = self.find(ref)
        if found is None:
            return [(_endpoint(ref.registry, "", insecure=False, mirror=False), ref.repository)]
        entry, matched = found
        if entry.blocked:
            raise BlockedError(
                f"pulling image {ref} is blocked by registry prefix {entry.prefix!r} "
                f"in {entry.source or 'registries.conf'}")
        by_digest = ref.digest is not None
        out: list[tuple[Endpoint, str]] = []
        if not (entry.mirror_by_digest_only and not by_digest):
            for m in entry.mirrors:
                if m.pull_from_mirror == "digest-only" and not by_digest:
                    continue
                if m.pull_from_mirror == "tag-only" and by_digest:
                    continue
                out.append(_rewrite(ref, matched, m.location, m.insecure, mirror=True))
        location = entry.location or matched
        out.append(_rewrite(ref, matched, location, entry.insecure, mirror=False))
        return out


def _read_toml(path: Path) -> dict | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read registries configuration {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _credential_helpers(data: dict, source: str) -> list[str] | None:
    """``credential-helpers``: "containers-auth.json" (the auth files) or helper names."""
    helpers = data.get("credential-helpers")
    if helpers is None:
        return None
    if not (isinstance(helpers, list) and all(isinstance(h, str) and h for h in helpers)):
        raise ConfigError(f"{source}: credential-helpers must be a list of helper names")
    for h in helpers:
        if "/" in h or h.startswith("-"):
            raise ConfigError(f"{source}: credential-helpers: {h!r} is not a helper name "
                              "(docker-credential-<name> is run from PATH)")
    return list(helpers)


def _entries_from(data: dict, source: str) -> tuple[list[RegistryEntry], list[str] | None]:
    """Translate one parsed file (v1 or v2 format) into entries."""
    for key in data:
        if key not in _TOP_KEYS:
            log.warning("%s: ignoring unknown key %r", source, key)
    if "registries" in data and "registry" in data:
        raise ConfigError(f"{source}: mixes the v1 [registries.*] tables with v2 [[registry]]")
    search = data.get("unqualified-search-registries")
    if search is not None and not (isinstance(search, list) and all(isinstance(x, str) for x in search)):
        raise ConfigError(f"{source}: unqualified-search-registries must be a list of strings")
    if "registries" in data:
        return _v1_entries(data["registries"], source)
    tables = data.get("registry", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{source}: 'registry' must be an array of tables ([[registry]])")
    return [_v2_entry(t, source) for t in tables], search


def _v1_entries(v1: object, source: str) -> tuple[list[RegistryEntry], list[str] | None]:
    if not isinstance(v1, dict):
        raise ConfigError(f"{source}: 'registries' must be a table")
    lists: dict[str, list[str]] = {}
    for kind in ("search", "insecure", "block"):
        table = v1.get(kind, {})
        regs = table.get("registries", []) if isinstance(table, dict) else None
        if not isinstance(regs, list) or not all(isinstance(r, str) for r in regs):
            raise ConfigError(f"{source}: [registries.{kind}] registries must be a list of strings")
        lists[kind] = regs
    entries: dict[str, RegistryEntry] = {}
    for kind in ("insecure", "block"):
        for r in lists[kind]:
            loc = _check_location(r.strip(), source, "registries")
            e = entries.setdefault(loc, RegistryEntry(prefix=loc, location=loc, source=source))
            if kind == "insecure":
                e.insecure = True
            else:
                e.blocked = True
    return list(entries.values()), (lists["search"] or None)


def _v2_entry(t: object, source: str) -> RegistryEntry:
    if not isinstance(t, dict):
        raise ConfigError(f"{source}: each [[registry]] must be a table")
    for key in t:
        if key not in _REGISTRY_KEYS:
            log.warning("%s: [[registry]] %r: ignoring unknown key %r",
                        source, t.get("prefix") or t.get("location"), key)
    location = _str(t, "location", source, "")
    prefix = _str(t, "prefix", source, "") or location
    if not prefix:
        raise ConfigError(f"{source}: a [[registry]] needs a prefix or a location")
    where = f"[[registry]] {prefix!r}"
    if prefix.startswith("*"):
        if not _WILDCARD.fullmatch(prefix):
            raise ConfigError(f"{source}: {where}: a wildcard prefix must look like '*.example.com'")
        if location and location == prefix:
            location = ""  # wildcard without a separate location: no rewrite
        elif location:
            raise ConfigError(f"{source}: {where}: a wildcard prefix cannot have a location")
    else:
        _check_location(prefix, source, "prefix")
    if location:
        _check_location(location, source, "location", rewrite=True)
    mirrors = []
    raw_mirrors = t.get("mirror", [])
    if not isinstance(raw_mirrors, list):
        raise ConfigError(f"{source}: {where}: 'mirror' must be an array of tables ([[registry.mirror]])")
    for m in raw_mirrors:
        if not isinstance(m, dict):
            raise ConfigError(f"{source}: {where}: each [[registry.mirror]] must be a table")
        for key in m:
            if key not in _MIRROR_KEYS:
                log.warning("%s: %s mirror: ignoring unknown key %r", source, where, key)
        loc = _str(m, "location", source, "")
        if not loc:
            raise ConfigError(f"{source}: {where}: a [[registry.mirror]] needs a location")
        _check_location(loc, source, "mirror location", rewrite=True)
        pfm = _str(m, "pull-from-mirror", source, "all") or "all"
        if pfm not in _PULL_FROM_MIRROR:
            raise ConfigError(f"{source}: {where}: pull-from-mirror must be one of {_PULL_FROM_MIRROR}")
        mirrors.append(Mirror(location=loc, insecure=_bool(m, "insecure", source),
                              pull_from_mirror=pfm))
    return RegistryEntry(prefix=prefix, location=location,
                         insecure=_bool(t, "insecure", source),
                         blocked=_bool(t, "blocked", source),
                         mirror_by_digest_only=_bool(t, "mirror-by-digest-only", source),
                         mirrors=mirrors, source=source)


def _str(t: dict, key: str, source: str, default: str) -> str:
    v = t.get(key, default)
    if not isinstance(v, str):
        raise ConfigError(f"{source}: {key!r} must be a string, not {type(v).__name__}")
    return v.strip()


def _bool(t: dict, key: str, source: str) -> bool:
    v = t.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key!r} must be true or false, not {v!r}")
    return v


def _check_location(value: str, source: str, what: str, rewrite: bool = False) -> str:
    if "://" in value:
        raise ConfigError(f"{source}: {what} {value!r} must not contain a URL scheme")
    if "*" in value:
        raise ConfigError(f"{source}: {what} {value!r}: a wildcard is allowed only as a whole "
                          "'*.example.com' prefix")
    if not _LOCATION.fullmatch(value):
        raise ConfigError(f"{source}: {what} {value!r} is not host[:port][/path]")
    if rewrite and _has_tag_or_digest(value):
        raise ConfigError(f"{source}: {what} {value!r}: als does not support a tag or digest here")
    return value


def _has_tag_or_digest(value: str) -> bool:
    if "@" in value:
        return True
    slash = value.rfind("/")
    return slash >= 0 and ":" in value[slash:]


def _match(prefix: str, ref: Reference) -> str | None:
    """The part of the reference ``prefix`` matches at a component boundary, or None."""
    if prefix.startswith("*."):
        host = ref.registry.rsplit(":", 1)[0] if not ref.registry.endswith("]") else ref.registry
        return ref.registry if host.endswith(prefix[1:]) else None
    name = ref.name
    if _has_tag_or_digest(prefix):
        full = str(ref)
        if full == prefix or full.startswith(prefix + "@"):
            return prefix
        return None
    if name == prefix or name.startswith(prefix + "/"):
        return prefix
    return None


def _rewrite(ref: Reference, matched: str, location: str, insecure: bool,
             mirror: bool) -> tuple[Endpoint, str]:
    """Replace the matched part of the name by ``location``; split into host and repository."""
    if _has_tag_or_digest(matched):  # a tag/digest prefix matches the whole name
        matched = ref.name
    remainder = ref.name[len(matched):].lstrip("/")
    host, _, path = location.partition("/")
    repository = "/".join(p for p in (path, remainder) if p)
    if not repository:
        raise ConfigError(f"registries.conf rewrites image {ref} to {location!r}, which has no repository")
    return _endpoint(host, path, insecure, mirror), repository


def _endpoint(host: str, path_prefix: str, insecure: bool, mirror: bool) -> Endpoint:
    if host == DOCKER_HUB:
        host = DOCKER_HUB_HOST
    return Endpoint(host=host, path_prefix=path_prefix, insecure=insecure, is_mirror=mirror)
