"""The `als` command line: argument parsing and wiring, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from als import __version__
from als.errors import ALSError

log = logging.getLogger("als")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="mount the additional layer store (runs in the foreground)",
        description="Mount an additional layer store for Podman and CRI-O at MOUNTPOINT and serve it "
                    "in the foreground until SIGINT or SIGTERM, which unmount it. Name the mount point "
                    "in storage.conf: additionallayerstores = [\"MOUNTPOINT:ref\"]. eStargz layers are "
                    "served lazily; every other layer is declined and pulled normally by the engine.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where to mount the store (created if missing)")
    p.add_argument("--root", default="/var/lib/als", help="chunk cache and state (default: %(default)s)")
    p.add_argument("--config", default=None,
                   help="TOML config file (default: /etc/als/config.toml if it exists); keys are "
                        "documented in config/config.toml")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="default: %(default)s")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="als", description="A lazy-pulling additional layer store for Podman and CRI-O: containers "
                               "start after fetching only the bytes they read.")
    parser.add_argument("--version", action="version", version=f"als {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _serve_parser(sub)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def cmd_serve(args) -> int:
    from als.daemon import serve
    return serve(Path(args.mountpoint), Path(args.root), args.config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    try:
        return args.func(args)
    except ALSError as e:
        log.error("%s", e)
        return 1
