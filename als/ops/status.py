"""`als status`: what the running store serves, how much of it is cached, what is failing.

``collect`` runs inside the daemon (the control socket's ``status`` operation)
and returns plain JSON-able data; ``render`` turns that into the table the
command prints. Both only read: asking for status never fetches anything.

How much of a layer is cached is counted over its file contents (the chunks
a read can ask for, each distinct chunk once), against the same total, so
100% means no read of that layer will ever reach the registry again.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path

from als import __version__
from als import metrics

ERRORS_WINDOW = 600.0  # seconds of registry errors shown


def _layer_chunks(layer) -> dict[str, tuple[int, bool]]:
    """digest -> (size, needs no fetch) for every distinct chunk of the layer's files."""
    out: dict[str, tuple[int, bool]] = {}
    stack = [layer.view.root]
    while stack:
        node = stack.pop()
        if node.children is not None:
            stack.extend(node.children.values())
            continue
        for c in node.chunks:
            out.setdefault(c.digest, (c.size, c.zeros))
    return out


def _cached(cache, digest: str) -> bool:
    contains = getattr(cache, "contains", None)
    return contains is not None and contains(digest)


def _layer_status(store, layer) -> dict:
    chunks = _layer_chunks(layer)
    cache = store.fetcher.cache
    total = sum(size for size, _ in chunks.values())
    cached = sum(size for d, (size, zeros) in chunks.items() if zeros or _cached(cache, d))
    return {"digest": layer.desc.digest, "state": "ready", "uses": store.uses(layer.ref, layer.desc.digest),
            "compressed_bytes": layer.desc.size, "diff_bytes": layer.diff_size, "files": layer.view.file_count,
            "file_bytes": total, "cached_bytes": cached}


def _future_state(fut: Future) -> tuple[str, object]:
    if not fut.done():
        return "resolving", None
    exc = fut.exception()
    if exc is not None:
        return "failed", exc
    return "done", fut.result()


def collect(store, *, mountpoint: Path | str = "", root: Path | str = "", started: float | None = None,
            errors=None, errors_window: float = ERRORS_WINDOW, rootfs: list | None = None,
            keeper=None) -> dict:
    """The status document `als status --json` prints."""
    served: dict[str, dict[str, object]] = {}
    for layer in store.layers():
        served.setdefault(layer.ref, {})[layer.desc.digest] = layer
    resolutions = store.resolutions()
    images = []
    for ref in sorted(set(resolutions) | set(served)):
        image = {"ref": ref, "state": "resolved", "manifest": None, "error": None, "layers": []}
        res = resolutions.get(ref)
        pending: dict[str, Future] = {}
        if res is not None:
            state, value = _future_state(res.image)
            if state == "failed":
                image.update(state="failed", error=str(value).removeprefix(f"image {ref}: "))
            elif state == "resolving":
                image["state"] = "resolving"
            else:
                image["manifest"] = value.manifest_digest
            pending = dict(res.layers)
        layers = served.get(ref, {})
        evicted = [d for d in (list(res.evicted) if res is not None else []) if d not in pending and d not in layers]
        for digest in list(pending) + [d for d in layers if d not in pending] + evicted:
            if digest in evicted:
                image["layers"].append({"digest": digest, "state": "evicted", "uses": store.uses(ref, digest),
                                        "reason": "unused, dropped from memory; rebuilt when looked up again"})
                continue
            if digest in layers:
                image["layers"].append(_layer_status(store, layers[digest]))
                continue
            state, value = _future_state(pending[digest])
            if state == "done":
                image["layers"].append(_layer_status(store, value))
            else:
                reason = str(value).removeprefix(f"image {ref} layer {digest}: ") if value is not None else None
                image["layers"].append({"digest": digest, "state": "declined" if state == "failed" else state,
                                        "reason": reason, "uses": store.uses(ref, digest)})
        images.append(image)
    cache = store.fetcher.cache
    stats = cache.stats() if hasattr(cache, "stats") else None
    consumers = getattr(store, "consumers", None)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "mountpoint": str(mountpoint),
        "root": str(root),
        "uptime_seconds": round(time.time() - started, 1) if started else None,
        "cache": {"bytes": stats.bytes if stats else None, "entries": stats.entries if stats else None,
                  "limit_bytes": stats.max_bytes if stats else None,
                  "hits": stats.hits if stats else cache.hits, "misses": stats.misses if stats else cache.misses},
        "inflight_chunks": store.fetcher.inflight(),
        "background": metrics.background_fetches(),
        "images": images,
        "registry_errors_window_seconds": errors_window,
        "registry_errors": errors.since(errors_window) if errors is not None else [],
        # Engines that asked for layers; "affected" ones lose lazily pulled layers (als/store/consumer.py).
        "engines": [c.as_dict() for c in consumers.all()] if consumers is not None else [],
        # Images mounted as root file systems with `als mount` (als/rootfs/mounts.py).
        "rootfs": list(rootfs or []),
        # Who keeps the FUSE connections for the next store (als/ops/handover.py): "systemd", "holder" or null.
        "connections": {"kept_by": (keeper.source or None) if keeper is not None else None,
                        "holder_pid": (keeper.holder_pid or None) if keeper is not None else None},
    }


# ---- the human table -----------------------------------------------------------------
def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _connections_line(conn: dict) -> str:
    kept = conn.get("kept_by")
    if kept == "holder":
        return (f"FUSE connections kept by the connection holder (pid {conn.get('holder_pid')}): "
                "running containers keep their files across a restart of the store")
    if kept == "systemd":
        return ("FUSE connections kept in systemd's file descriptor store: "
                "running containers keep their files across a restart of the store")
    return "FUSE connections not kept: a restart of the store mounts afresh and running containers lose their files"


def _rootfs_lines(mounts: list[dict]) -> list[str]:
    """The root file systems `als mount` made: where, which image, its layers (bottom first)."""
    if not mounts:
        return []
    lines = ["", "ROOT FILE SYSTEM (als mount)  IMAGE  LAYERS"]
    for m in mounts:
        lines.append(f"{m['dir']}  {m['image']}  {len(m['layers'])}: "
                     + " ".join(_short(d) for d in m["layers"]))
    return lines


def render(st: dict) -> str:
    """The table `als status` prints by default."""
    lines = [f"als {st['version']} (pid {st['pid']}, up {_duration(st['uptime_seconds'])}) "
             f"serving {st['mountpoint']}, cache and state in {st['root']}"]
    c = st["cache"]
    limit = f" of {size(c['limit_bytes'])}" if c.get("limit_bytes") else ""
    entries = f" in {c['entries']} chunks" if c.get("entries") is not None else ""
    lines.append(f"cache: {size(c['bytes'])}{limit}{entries}; {c['hits']} hits, {c['misses']} misses")
    bg = st["background"]
    left = sum(b["total_bytes"] - b["fetched_bytes"] for b in bg)
    lines.append(f"fetching now: {st['inflight_chunks']} chunks; background fetches: {len(bg)}"
                 + (f", {size(left)} left" if bg else ""))
    lines.append(_connections_line(st.get("connections") or {}))
    for engine in st.get("engines", []):
        if engine["affected"]:
            built = f"{engine['module']} {engine['version']}" if engine["version"] else "containers/storage 1.58 or later"
            lines.append(f"WARNING: {engine['program']} ({built}) loses layers pulled from this store: later commands "
                         "say 'layer not known' (README: 'Podman and CRI-O versions')")
    lines.append("")
    rows = [("IMAGE", "LAYER", "STATE", "USES", "CACHED")]
    for image in st["images"]:
        ref = image["ref"]
        if image["state"] != "resolved" and not image["layers"]:
            rows.append((ref, "-", image["state"], "-", _clip(image.get("error") or "", 80)))
        for layer in image["layers"]:
            if layer["state"] == "ready":
                total = layer["file_bytes"]
                pct = f" ({100 * layer['cached_bytes'] // total}%)" if total else ""
                cached = f"{size(layer['cached_bytes'])} of {size(total)}{pct}"
            else:
                cached = _clip(layer.get("reason") or "", 80)
            rows.append((ref, _short(layer["digest"]), layer["state"], str(layer["uses"]), cached))
            ref = ""
    if len(rows) == 1:
        lines.append("no image looked up yet")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append("  ".join(v.ljust(w) if i != 3 else v.rjust(w) for i, (v, w) in
                                   enumerate(zip(r[:4], widths))) + "  " + r[4])
    lines += _rootfs_lines(st.get("rootfs") or [])
    errs = st["registry_errors"]
    minutes = int(st["registry_errors_window_seconds"] // 60)
    lines.append("")
    if not errs:
        lines.append(f"registry errors in the last {minutes} minutes: none")
    else:
        lines.append(f"registry errors in the last {minutes} minutes: {len(errs)}")
        for e in errs[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            lines.append(f"  {when} {e['registry']} {e['what']}: {_clip(e['message'], 140)}")
    return "\n".join(line.rstrip() for line in lines)
