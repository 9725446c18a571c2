"""The `als convert`, `als optimize` and `als index` subcommands: their arguments and wiring."""

from __future__ import annotations

import argparse
import sys

from als.errors import ALSError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _size(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (like 4194304, 512K, 4M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return n


def _locations(p: argparse.ArgumentParser) -> None:
    """SRC, DST and how registries are reached: what every image tool takes."""
    p.add_argument("src", metavar="SRC", help="source image: a registry reference, or oci:DIR[:TAG]")
    p.add_argument("dst", metavar="DST", help="destination: a registry reference with a tag, or oci:DIR[:TAG]")
    p.add_argument("--config", default=None,
                   help="TOML config file for the [registry] settings (default: /etc/als/config.toml "
                        "if it exists); registries.conf and auth files are Podman's, as for `als serve`")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="default: %(default)s")


def _common(p: argparse.ArgumentParser) -> None:
    _locations(p)
    p.add_argument("--chunk-size", type=_size, default=4 << 20,
                   help="largest chunk of a file, fetched and verified as one (default: 4M)")
    p.add_argument("--compression-level", type=int, default=None,
                   help="gzip 1-9 (default 9), or zstd 1-22 with --zstd-chunked (default 3)")
    p.add_argument("--prioritize", metavar="FILE", default=None,
                   help="a profile: paths (one per line) written first in each layer, followed by "
                        ".prefetch.landmark, so the store prefetches them in one request")
    p.add_argument("--zstd-chunked", action="store_true", help="write zstd:chunked instead of eStargz")
    p.add_argument("--platform", default="", metavar="OS/ARCH[/VARIANT]",
                   help="convert only this platform of a multi-platform index (the result is one image)")
    p.add_argument("--reconvert", action="store_true",
                   help="convert layers that already are eStargz (or zstd:chunked) too; by default they "
                        "are copied as they are")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an image's layers to eStargz (or zstd:chunked) and push it",
        description="Read the image SRC, convert every layer (gzip, zstd or uncompressed) to eStargz, and "
                    "store the result as DST: the config keeps its history and labels with new diff_ids, "
                    "the OCI manifest carries the annotations lazy pulling needs, and every platform of "
                    "an index is converted. Nothing is stored under DST unless the whole image "
                    "converted. Progress is shown on a terminal; the last line printed is DST@DIGEST.")
    _common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "optimize", help="record what a workload reads, then convert with those files first",
        description="Convert SRC, run CMD in it with Podman through a private `als serve`, record the "
                    "files the store sees read (in order), stop the workload after --timeout, and "
                    "convert again with those files first in each layer (followed by "
                    ".prefetch.landmark), storing the result as DST. Needs root (Podman, FUSE). "
                    "Usage: als optimize SRC DST [options] -- CMD [ARGS...]")
    _common(p)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the workload may run before it is stopped (default: %(default)s)")
    p.add_argument("--profile-out", metavar="FILE", default=None,
                   help="also save the recorded profile here (reuse it with --prioritize)")
    p.add_argument("--work-ref", default=None, metavar="REF",
                   help="registry reference for the intermediate (unprioritized) image the workload runs "
                        "from; default: DST's repository, by digest only (required when DST is oci:)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the temporary store, cache and Podman state go (default: a new temp dir)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the workload, run in the image")
    p.set_defaults(func=cmd_optimize)
    add_index_parser(sub)


def add_index_parser(sub) -> None:
    p = sub.add_parser(
        "index", help="make an image's gzip layers lazily pullable without converting them",
        description="Read every gzip layer of the image SRC once, write a seekable index of it (its files, "
                    "and a checkpoint every --span-size bytes of its tar stream), store each index as a blob "
                    "in DST's repository, and store DST: SRC's config and layers (mounted from SRC's "
                    "repository, not uploaded again), each gzip layer annotated with its index's digest. "
                    "The indexes are also published as an OCI 1.1 referrer of each of SRC's image manifests "
                    "(the referrers API, or its tag fallback), so that engines asking about layers by blob "
                    "digest (Podman 4.x) pull SRC itself lazily. "
                    "Progress is shown on a terminal; the last line printed is DST@DIGEST.")
    _locations(p)
    p.add_argument("--span-size", type=_size, default=2 << 20,
                   help="uncompressed bytes between checkpoints: what one read fetches and inflates at most "
                        "(default: 2M)")
    p.add_argument("--platform", default="", metavar="OS/ARCH[/VARIANT]",
                   help="index only this platform of a multi-platform index (the result is one image)")
    p.add_argument("--no-referrers", dest="referrers", action="store_false",
                   help="do not publish the indexes as referrers of SRC (nothing is written to SRC's repository)")
    p.set_defaults(func=cmd_index)


def _options(args):
    from als.tools.convert import ConvertOptions
    from als.tools.profile import read_profile
    return ConvertOptions(chunk_size=args.chunk_size, compression_level=args.compression_level,
                          prioritized=read_profile(args.prioritize) if args.prioritize else None,
                          zstd_chunked=args.zstd_chunked, platform=args.platform, reconvert=args.reconvert)


def _client_factory(config):
    made = []

    def factory():
        if not made:
            from als.registry.configured import registry_client
            made.append(registry_client(config))
        return made[0]
    return factory


def cmd_convert(args) -> int:
    from als.config import load_config
    from als.tools.convert import convert
    from als.tools.progress import Progress
    from als.tools.transport import open_transport
    config = load_config(args.config)
    factory = _client_factory(config)
    src = open_transport(args.src, factory)
    dst = open_transport(args.dst, factory)
    result = convert(src, dst, _options(args), Progress())
    print(f"{dst}@{result.digest}")
    return 0


def cmd_optimize(args) -> int:
    from als.config import load_config
    from als.tools.optimize import OptimizeOptions, optimize
    from als.tools.progress import Progress
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd and not args.prioritize:
        raise ALSError("als optimize needs a workload: als optimize SRC DST -- CMD [ARGS...]")
    config = load_config(args.config)
    opts = OptimizeOptions(convert=_options(args), command=cmd, timeout=args.timeout,
                           profile_out=args.profile_out, work_ref=args.work_ref, work_dir=args.work_dir,
                           config_path=args.config)
    result = optimize(args.src, args.dst, opts, config, Progress())
    print(f"{result.destination}@{result.digest}")
    if result.recorded is not None:
        print(f"recorded {len(result.recorded)} files read by the workload", file=sys.stderr)
    return 0


def cmd_index(args) -> int:
    from als.config import load_config
    from als.tools.index import IndexOptions, index_image
    from als.tools.progress import Progress
    from als.tools.transport import open_transport
    config = load_config(args.config)
    factory = _client_factory(config)
    src = open_transport(args.src, factory)
    dst = open_transport(args.dst, factory)
    options = IndexOptions(span_size=args.span_size, platform=args.platform, referrers=args.referrers)
    result = index_image(src, dst, options, Progress())
    print(f"{dst}@{result.digest}")
    return 0
