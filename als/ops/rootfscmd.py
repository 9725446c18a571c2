"""`als mount` and `als umount`: ask the running store for an image's root file system, print how to run it.

The store does the mounting (als/rootfs/mounts.py) because it resolves the
image with its own registries.conf, credentials and verification, keeps the
layers in use, and detaches the overlay before its own mount goes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from als.ops import control
from als.rootfs import mountinfo, overlay
from als.rootfs.podmanargs import podman_args

DEFAULT_ROOT = "/var/lib/als"
MOUNT_TIMEOUT = 600.0  # resolving waits at most resolve.timeout per step; this only bounds a wedged store


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "mount", help="mount an image's merged root file system, lazily, for podman run --rootfs DIR:O",
        description="Ask the running `als serve` to make DIR the image's root file system: every layer "
                    "merged read-only, served lazily, with no pull. Run it with `podman run --rootfs DIR:O`; "
                    "--print-args prints the options that give the container the image's config. All layers "
                    "must be eStargz or zstd:chunked, or nothing is mounted. Mounting the same image on the "
                    "same DIR again only prints.")
    p.add_argument("image", metavar="IMAGE", help="image reference, as for podman pull")
    p.add_argument("dir", metavar="DIR", help="an existing empty directory")
    p.add_argument("--platform", default="", metavar="OS/ARCH[/VARIANT]",
                   help="the platform to pick from a multi-platform image (default: the store's)")
    p.add_argument("--print-args", action="store_true",
                   help="print the podman run arguments, one per line: the image's entrypoint, environment, "
                        "user and working directory, then --rootfs DIR:O, then its command. Use: "
                        "mapfile -t args < <(als mount --print-args IMAGE DIR); podman run --rm \"${args[@]}\"")
    p.add_argument("--no-cmd", action="store_true",
                   help="with --print-args: leave out the image's command, to give your own after the args")
    p.add_argument("--root", default=os.environ.get("ALS_ROOT", DEFAULT_ROOT),
                   help="as given to `als serve` (default: $ALS_ROOT or %(default)s)")
    p.set_defaults(func=cmd_mount)
    p = sub.add_parser(
        "umount", help="unmount a root file system made by `als mount`",
        description="Ask the running `als serve` to unmount DIR and release its layers. Refused while a "
                    "container runs on it (Podman's overlay on DIR, or a bind mount of it, in any mount "
                    "namespace); --force detaches it anyway.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true",
                   help="detach even while containers use it (they keep their view until they exit)")
    p.add_argument("--root", default=os.environ.get("ALS_ROOT", DEFAULT_ROOT),
                   help="as given to `als serve` (default: $ALS_ROOT or %(default)s)")
    p.set_defaults(func=cmd_umount)


def cmd_mount(args) -> int:
    target = os.path.abspath(args.dir)
    # Inside `podman unshare` (a user namespace), this process is where the user's Podman runs containers.
    namespace = mountinfo.own_namespace() if overlay.in_user_namespace() else ""
    answer = control.request(Path(args.root), "rootfs-mount", timeout=MOUNT_TIMEOUT, image=args.image,
                             dir=target, platform=args.platform, namespace=namespace)
    m = answer["mount"]
    if args.print_args:
        built = podman_args(answer["config"], m["dir"], with_cmd=not args.no_cmd,
                            is_dir=lambda p: os.path.isdir(os.path.join(m["dir"], p.lstrip("/"))))
        for w in built.warnings:
            print(f"als mount: {w}", file=sys.stderr)
        sys.stdout.write(built.lines())
    else:
        state = "mounted" if answer["new"] else "already mounted"
        print(f"{state}: image {m['image']} ({len(m['layers'])} layers) at {m['dir']}, read-only; "
              f"run it with: podman run --rootfs {m['dir']}:O ...")
    return 0


def cmd_umount(args) -> int:
    answer = control.request(Path(args.root), "rootfs-umount", timeout=60, dir=os.path.abspath(args.dir),
                             force=args.force)
    m = answer["mount"]
    users = answer.get("detached_users") or []
    print(f"unmounted {m['dir']} (image {m['image']})" + (f"; detached from: {'; '.join(users)}" if users else ""))
    return 0
