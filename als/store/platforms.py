"""Which manifest of a multi-platform image the store serves: the host's, or the one configured.

An image index lists a manifest per platform in OCI's words (``amd64``,
``arm64/v8``), which are not Python's (``x86_64``, ``aarch64``); a lookup by
tag must land on the manifest Podman itself would pull on this host.
"""

from __future__ import annotations

import platform

from als.errors import ALSError, NotFoundError


def host_platform() -> tuple[str, str, str]:
    """The (os, architecture, variant) an index is searched for, in OCI's words (Python's differ)."""
    machine = platform.machine().lower()
    arch, variant = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"),
                     "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "ppc64le": ("ppc64le", ""),
                     "s390x": ("s390x", "")}.get(machine, (machine, ""))
    return "linux", arch, variant


def parse_platform(text: str) -> tuple[str, str, str]:
    """``os/arch[/variant]`` as (os, architecture, variant)."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ALSError(f"platform {text!r} is not os/arch[/variant] (like linux/amd64 or linux/arm64/v8)")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else ""


def pick_platform(index: dict, ref: str, platform: tuple[str, str, str]) -> str:
    """The digest of the manifest for ``platform`` in image ``ref``'s ``index`` (an exact variant first)."""
    want_os, want_arch, want_variant = platform
    candidates = []
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        if p.get("os") == want_os and p.get("architecture") == want_arch:
            exact = not want_variant or p.get("variant", want_variant) == want_variant
            candidates.append((not exact, m["digest"]))
    if not candidates:
        offered = ["/".join(filter(None, (str(p.get("os", "")), str(p.get("architecture", "")),
                                          str(p.get("variant", "")))))
                   for p in (m.get("platform") or {} for m in index.get("manifests") or [])]
        raise NotFoundError(f"image {ref} has no manifest for {'/'.join(filter(None, platform))} "
                            f"(it has: {', '.join(filter(None, offered)) or 'none with a platform'})")
    return sorted(candidates)[0][1]
