"""The daemon's TOML configuration, as dataclasses with defaults.

Every key is documented in ``config/config.toml``. Unknown keys and wrong
types are errors naming the key, because a silently ignored typo in a store
that sits under every container is worse than a refusal to start.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from als.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/als/config.toml")


@dataclass
class ResolveConfig:
    timeout: float = 30.0  # seconds a lookup may wait for an image and its layers
    ttl: float = 120.0  # seconds a resolved tag is trusted before it is resolved again
    allow_unverified: bool = False  # serve eStargz layers that carry no TOC digest annotation
    platform: str = ""  # "os/arch[/variant]" picked from an index; empty: this host's
    tail_size: int = 512 << 10  # bytes read from a blob's end at once, hoping the TOC is in them
    max_toc_size: int = 64 << 20  # largest (uncompressed) TOC accepted
    max_toc_entries: int = 1 << 20  # most TOC entries (and, with 64Ki implicit directories, tree nodes)
    failure_ttl: float = 5.0  # seconds a resolution that failed for a transient reason is kept
    max_idle_layers: int = 64  # resolved layers kept in memory that no container uses; 0: no bound
    gzip_index_referrers: bool = False  # find gzip indexes of unannotated gzip layers through referrers


@dataclass
class RegistryConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3  # per request, with exponential backoff
    request_deadline: float = 60.0  # seconds one request may take in all: retries, backoff, a slow body
    registries_conf: str = ""  # override $CONTAINERS_REGISTRIES_CONF / /etc/containers/registries.conf
    certs_dir: str = ""  # per-host TLS dirs (<dir>/<host:port>/*.crt, *.cert, *.key); "": Podman's
    global_auth_file: str = ""  # CRI-O's global_auth_file, read before Podman's auth files
    kubelet_config: str = "/var/lib/kubelet/config.json"  # read after Podman's auth files; "": off
    credential_helper_timeout: float = 10.0  # seconds a docker-credential-<name> may take


@dataclass
class CacheConfig:
    memory_bytes: int = 2 << 20  # in-memory tier of decompressed chunks, and as much again awaiting disk
    max_bytes: int = 20 << 30  # disk cache limit (least recently used chunks go first); 0: no limit


@dataclass
class FetchConfig:
    prefetch_size: int = 0  # bytes from the blob start to prefetch when a layer has no landmark
    prefetch_request: int = 64 << 20  # largest single request of a prefetch
    predict: bool = True  # fetch what a container start reads next, side by side (als/layer/startup.py)
    background: bool = True  # stream the rest of each layer into the cache after it resolves
    background_layers: int = 2  # layers fetched in the background at once
    background_step: int = 4 << 20  # bytes per background request
    background_quiet: float = 0.5  # seconds of no container read or foreground fetch before it starts
    background_delay: float = 5.0  # longest it waits for a container start, that quiet, or the foreground
    readahead_min: int = 256 << 10  # first read-ahead window once misses turn sequential
    readahead_max: int = 4 << 20  # largest read-ahead window
    file_readahead: int = 8 << 20  # on a miss, fetch the rest of the file up to this many compressed bytes
    dir_readahead: int = 512 << 10  # on a small file's miss, the small files after it in its directory
    span_cut: bool = False  # gzip index: fetch a span from its checkpoint only as far as a read needs
    coalesce_gap: int = 64 << 10  # fetch the bytes between two missing chunks closer than this
    max_request: int = 16 << 20  # largest foreground request
    read_timeout: float = 60.0  # longest a read waits for a chunk someone else is fetching


@dataclass
class FuseConfig:
    entry_timeout: float = 3600.0  # content is immutable: let the kernel cache names ...
    attr_timeout: float = 3600.0  # ... and attributes
    negative_timeout: float = 60.0  # and misses (Python's import path probing)
    threads: int = 16  # threads per mount answering what needs no waiting (cached reads, lookups, listings)
    waiting_threads: int = 64  # threads per mount for requests that wait (registry reads, resolves)
    xattr_free_mount: bool = True  # layers without xattrs through <mount>/.noxattr: no getxattr round trips
    keep_connection: bool = True  # keep /dev/fuse outside the process: running containers survive a restart
    restart_grace: float = 30.0  # seconds the holder waits for a successor before it unmounts


@dataclass
class MetricsConfig:
    address: str = ""  # Prometheus exporter: "" (off), "127.0.0.1:PORT", "[::1]:PORT" or "unix:/path"


@dataclass
class Config:
    resolve: ResolveConfig = field(default_factory=ResolveConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_config(path: str | Path | None) -> Config:
    """Read ``path``; None means the default file, which may be missing."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Config()
        path = DEFAULT_CONFIG
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return _build(Config, raw, str(path), "")


def _build(cls, raw: dict, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{source}: unknown key {prefix}{key}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            values[key] = _build(type(default), value, source, f"{prefix}{key}.")
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{source}: {prefix}{key} must be a {type(default).__name__}, not {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{source}: {prefix}{key} must not be negative")
        values[key] = value
    return cls(**values)
