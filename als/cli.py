"""The `als` command line: argument parsing and wiring, nothing else."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from als import __version__
from als.errors import ALSError

log = logging.getLogger("als")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="mount the additional layer store (runs in the foreground)",
        description="Mount an additional layer store for Podman and CRI-O at MOUNTPOINT and serve it "
                    "in the foreground until SIGINT, which unmounts it, or SIGTERM, which leaves it to the next "
                    "`als serve` where the FUSE connection is kept (see the README's Restarts). Name the mount point "
                    "in storage.conf: additionallayerstores = [\"MOUNTPOINT:ref\"]. eStargz and zstd:chunked "
                    "layers are served lazily; every other layer is declined and pulled normally by the "
                    "engine.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where to mount the store (created if missing)")
    p.add_argument("--root", default="/var/lib/als", help="chunk cache and state (default: %(default)s)")
    p.add_argument("--config", default=None,
                   help="TOML config file (default: /etc/als/config.toml if it exists); keys are "
                        "documented in config/config.toml")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="default: %(default)s")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text lines, or one JSON object per line for log collectors (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


def _status_parser(sub) -> None:
    p = sub.add_parser(
        "status", help="what the running store serves, caches and fetches",
        description="Ask the running `als serve` (through its control socket under --root, so as the "
                    "same user, root for a system store) for its mounted images and layers, how much of "
                    "each layer is cached, fetches in flight, cache use and recent registry errors.")
    p.add_argument("--root", default="/var/lib/als", help="as given to `als serve` (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="the whole status as one JSON document")
    p.set_defaults(func=cmd_status)


def _cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="show, prune or verify the chunk cache",
                       description="Manage the chunk cache under --root. Safe while `als serve` runs: "
                                   "a chunk removed here is fetched again when read.")
    p.add_argument("action", choices=("stats", "prune", "verify"),
                   help="stats: entries and bytes; prune: evict least recently used chunks down to "
                        "--max-bytes (default: all); verify: hash every chunk, drop corrupt ones")
    p.add_argument("--root", default="/var/lib/als", help="as given to `als serve` (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=0, help="prune down to this many bytes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="als", description="A lazy-pulling additional layer store for Podman and CRI-O: containers "
                               "start after fetching only the bytes they read.")
    parser.add_argument("--version", action="version", version=f"als {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _serve_parser(sub)
    _status_parser(sub)
    _cache_parser(sub)
    from als.ops import authhelper
    authhelper.add_parser(sub)
    from als.ops import rootfscmd
    rootfscmd.add_parsers(sub)
    from als.tools import commands
    commands.add_parsers(sub)
    return parser


def setup_logging(level: str, fmt: str = "text") -> None:
    from als.ops import logfmt
    logfmt.setup(level, fmt)


def cmd_serve(args) -> int:
    from als.ops.lean import without_charset_detection
    without_charset_detection()  # before the daemon's imports bring requests in
    from als.ops.daemon import serve
    return serve(Path(args.mountpoint), Path(args.root), args.config)


def cmd_status(args) -> int:
    import json

    from als.ops import control, status
    st = control.request(Path(args.root), "status", timeout=30)
    print(json.dumps(st, indent=2) if args.json else status.render(st))
    return 0


def cmd_cache(args) -> int:
    import json

    from als.fetch.cache import ChunkCache
    cache_dir = Path(args.root) / "cache"
    if not (cache_dir / "packs").is_dir():
        raise ALSError(f"no chunk cache under {args.root}")
    cache = ChunkCache(cache_dir, memory_bytes=0)
    if args.action == "prune":
        result = {"freed_bytes": cache.prune(args.max_bytes)}
    elif args.action == "verify":
        checked, removed = cache.verify()
        result = {"checked": checked, "removed": removed}
    else:
        result = {}
    st = cache.stats()
    result.update(entries=st.entries, bytes=st.bytes)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key.replace('_', ' '):>12}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    try:
        return args.func(args)
    except ALSError as e:
        log.error("%s", e)
        return 1
