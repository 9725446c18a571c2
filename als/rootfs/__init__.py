"""An image's merged root file system for `podman run --rootfs DIR:O`: `als mount`, `als umount`.

The kernel's overlayfs over the layers' ``diff`` directories in the store's own
FUSE mount, read-only, exactly as containers/storage stacks them for a pulled
image (overlay.py); the daemon's record of such mounts and who uses them
(mounts.py, mountinfo.py); and the `podman run` options that carry the image's
config, which a root file system has no place for (podmanargs.py).
"""
