"""Recording which files a workload reads, as the store sees them: what `als optimize` learns from.

The store is the one place that sees every file a container opens in a lazily
pulled layer (overlay passes the opens through), in order and per layer, with
no tracing in the container at all. The hook is one boolean check per open
while recording is off, and one dictionary insert per *new* file while it is
on; the ordered sets are bounded by the number of files in the layers.
Recording is switched on and read out through the control socket.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

OP_RECORD = "access-record"
OP_PROFILE = "access-profile"


@dataclass
class _LayerRecord:
    ref: str
    digest: str
    index: int
    files: dict[str, int] = field(default_factory=dict)  # path -> global sequence number of its first open


class AccessRecorder:
    """Per layer, the files opened for reading, in the order of their first open."""

    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._layers: dict[tuple[str, str], _LayerRecord] = {}

    def record(self, ref: str, digest: str, index: int, path: str) -> None:
        """Note that ``path`` (relative to the layer root) of layer ``digest`` of image ``ref`` was opened."""
        if not self.enabled:
            return
        with self._lock:
            rec = self._layers.get((ref, digest))
            if rec is None:
                rec = self._layers[(ref, digest)] = _LayerRecord(ref, digest, index)
            if path not in rec.files:
                rec.files[path] = next(self._seq)

    def control(self, enable: bool | None = None, clear: bool = False) -> dict:
        """Switch recording on or off and/or forget what was recorded; returns the state."""
        with self._lock:
            if clear:
                self._layers.clear()
            if enable is not None:
                self.enabled = bool(enable)
            return {"enabled": self.enabled, "layers": len(self._layers),
                    "files": sum(len(r.files) for r in self._layers.values())}

    def profile(self, ref: str = "") -> dict:
        """What was recorded (for one image reference, or all): per layer, and merged in first-open order."""
        with self._lock:
            records = [r for r in self._layers.values() if not ref or r.ref == ref]
            layers = [{"ref": r.ref, "digest": r.digest, "index": r.index,
                       "files": sorted(r.files, key=r.files.__getitem__)} for r in records]
            merged = sorted(((seq, path) for r in records for path, seq in r.files.items()))
        order: dict[str, None] = {}
        for _, path in merged:
            order.setdefault(path, None)
        layers.sort(key=lambda l: (l["ref"], l["index"]))
        return {"enabled": self.enabled, "layers": layers, "order": list(order)}


def control_handlers(recorder: AccessRecorder) -> dict:
    """The control-socket operations of the recorder."""
    def record(req: dict) -> dict:
        enable = req.get("enable")
        return recorder.control(None if enable is None else bool(enable), bool(req.get("clear", False)))

    def profile(req: dict) -> dict:
        return recorder.profile(str(req.get("ref", "")))

    return {OP_RECORD: record, OP_PROFILE: profile}
