"""A private `containerd` for interop tests, plus OCI image-archive helpers.

Tests use it to have stargz-snapshotter's own converter (`ctr-remote image
convert --estargz`) produce eStargz layers that our reader must accept. The
daemon gets its own root, state and socket under a fresh directory in /tmp
(socket paths must stay under ~108 bytes), runs without the CRI plugin, and is
stopped by PID.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
CTR_REMOTE_BIN = "ctr-remote"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


def missing_binaries() -> list[str]:
    """Names of the binaries the interop tests need but cannot find."""
    return [b for b in (CONTAINERD_BIN, CTR_BIN, CTR_REMOTE_BIN) if shutil.which(b) is None]


class ContainerdProcess:
    """Starts `containerd` with a config of our own; stops it by PID.

    Use as a context manager, or call start() and stop() (stop is safe to call
    twice and after a failed start).
    """

    def __init__(self, namespace: str = "default", start_timeout: float = 30.0):
        self.namespace = namespace
        self.start_timeout = start_timeout
        # Explicitly /tmp: $TMPDIR may be long and the socket path is limited.
        self.dir = Path(tempfile.mkdtemp(prefix="als-ctd-", dir="/tmp"))
        self.socket = self.dir / "c.sock"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _write_config(self) -> None:
        def q(path: Path) -> str:
            return json.dumps(str(path))  # a TOML basic string

        self.config_path.write_text(
            "version = 2\n"
            f"root = {q(self.dir / 'root')}\n"
            f"state = {q(self.dir / 'state')}\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f"  address = {q(self.socket)}\n"
            "[ttrpc]\n"
            f"  address = {q(self.dir / 'c.ttrpc')}\n"
        )

    def start(self) -> "ContainerdProcess":
        self._write_config()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [CONTAINERD_BIN, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.proc.returncode} during start:\n{self.log_tail()}"
                )
            if self.socket.exists():
                probe = subprocess.run(
                    [CTR_BIN, "-a", str(self.socket), "version"],
                    capture_output=True,
                    timeout=10,
                )
                if probe.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"containerd did not answer on {self.socket} within {self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate by PID, kill if it lingers, then delete its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "ContainerdProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, binary: str, args: list[str], timeout: float) -> str:
        cmd = [binary, "-a", str(self.socket), "-n", self.namespace, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed with {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def ctr(self, *args: str, timeout: float = 120) -> str:
        """Run `ctr` against this daemon; raise with its output on failure."""
        return self._run(CTR_BIN, list(args), timeout)

    def ctr_remote(self, *args: str, timeout: float = 120) -> str:
        """Run stargz-snapshotter's `ctr-remote` against this daemon."""
        return self._run(CTR_REMOTE_BIN, list(args), timeout)


# --------------------------------------------------------------------------
# OCI image archives (the format `ctr images import/export` speak)
# --------------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def build_oci_archive(layer_tars: list[bytes], ref_name: str = "latest") -> bytes:
    """Return an OCI image-layout tar of one linux/amd64 image with gzip layers.

    ``layer_tars`` are uncompressed layer tars; their sha256 become the
    config's diff_ids, as a real image would have them.
    """
    layers = [gzip.compress(t, mtime=0) for t in layer_tars]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in layer_tars]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(b), "size": len(b)} for b in layers
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sha256_digest(manifest),
                    "size": len(manifest),
                    "annotations": {REF_NAME_ANNOTATION: ref_name},
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tf, "index.json", index)
        for blob in (*layers, config, manifest):
            _add_bytes(tf, "blobs/sha256/" + sha256_digest(blob)[len("sha256:") :], blob)
    return out.getvalue()


@dataclass
class OCIArchive:
    """The parts of an exported image archive a test looks at."""

    index: dict
    manifest: dict
    config: dict
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes

    def layer_blobs(self) -> list[tuple[dict, bytes]]:
        """(descriptor, blob) for each layer, blobs checked against their digest."""
        return [(d, self.blobs[d["digest"]]) for d in self.manifest["layers"]]


def read_oci_archive(data: bytes) -> OCIArchive:
    """Parse an exported single-image OCI archive, verifying every blob digest."""
    blobs: dict[str, bytes] = {}
    index = None
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for member in tf:
            if not member.isreg():
                continue
            content = tf.extractfile(member).read()
            name = member.name.removeprefix("./")
            if name == "index.json":
                index = json.loads(content)
            elif name.startswith("blobs/"):
                _, algo, hexd = name.split("/")
                digest = f"{algo}:{hexd}"
                if sha256_digest(content) != digest:
                    raise ValueError(f"blob {name} does not match its digest")
                blobs[digest] = content
    if index is None:
        raise ValueError("archive has no index.json")
    desc = index["manifests"][0]
    manifest = json.loads(blobs[desc["digest"]])
    if manifest.get("mediaType") == "application/vnd.oci.image.index.v1+json" or "manifests" in manifest:
        manifest = json.loads(blobs[manifest["manifests"][0]["digest"]])
    config = json.loads(blobs[manifest["config"]["digest"]])
    return OCIArchive(index=index, manifest=manifest, config=config, blobs=blobs)
