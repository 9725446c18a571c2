"""Where `als convert` reads images from and writes them to: registries or OCI layouts.

Both kinds answer the same few questions (a manifest by tag or digest, a blob
as a verified stream) and accept the same writes (a blob, then a manifest), so
the converter never knows which one it talks to. Registry access uses the
same registries.conf, auth files and timeouts as `als serve`.

    SRC/DST spelling:   registry.example.com/ns/app:tag   (a registry reference)
                        oci:/path/to/dir[:tag]             (an OCI image layout)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from als.digest import hex_of, is_sha256, sha256_digest
from als.errors import ALSError, NotFoundError, VerificationError
from als.oci import OCI_INDEX
from als.reference import Reference, parse_reference
from als.registry.client import RegistryClient
from als.registry.pull import Manifest

OCI_PREFIX = "oci:"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'


class TransportError(ALSError):
    """An image location is malformed, or an image or blob is missing there."""


class ImageTransport(Protocol):
    """One image location: reads for a source, writes for a destination."""

    def get_manifest(self, reference: str | None = None) -> Manifest:
        """A manifest or index by digest, or the location's own tag when None."""

    def open_blob(self, digest: str) -> BinaryIO:
        """A blob as a stream; reading it to its end verifies it (VerificationError)."""

    def get_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob (a config), verified."""

    def has_blob(self, digest: str) -> bool:
        """Whether the destination already holds the blob (then it need not be copied)."""

    def push_blob(self, data: BinaryIO, digest: str, size: int) -> None:
        """Store a blob (seekable file, read from its current position)."""

    def put_manifest(self, data: bytes, media_type: str, *, tagged: bool) -> str:
        """Store a manifest by digest, and under the location's tag when ``tagged``; return its digest."""


def open_transport(spec: str, client_factory) -> "ImageTransport":
    """The transport for ``spec``; ``client_factory()`` makes a RegistryClient when one is needed."""
    if spec.startswith(OCI_PREFIX):
        path, tag = _split_layout(spec[len(OCI_PREFIX):])
        return OCILayout(Path(path), tag)
    try:
        ref = parse_reference(spec)
    except ValueError as e:
        raise TransportError(f"{spec!r} is neither an image reference nor oci:DIR[:TAG]: {e}") from None
    return RegistryImage(client_factory(), ref)


def _split_layout(rest: str) -> tuple[str, str]:
    if not rest:
        raise TransportError("oci: needs a directory, as in oci:/path/to/layout[:tag]")
    head, sep, tag = rest.rpartition(":")
    if sep and head and tag and "/" not in tag:
        return head, tag
    return rest, ""


class RegistryImage:
    def __init__(self, client: RegistryClient, ref: Reference):
        self.client = client
        self.ref = ref

    def __str__(self) -> str:
        return str(self.ref)

    def get_manifest(self, reference: str | None = None) -> Manifest:
        try:
            return self.client.get_manifest(self.ref, reference)
        except NotFoundError:
            raise TransportError(f"image {self.ref} has no manifest {reference or self.ref.reference}") from None

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return self.client.open_stream(self.ref, digest)
        except NotFoundError:
            raise TransportError(f"image {self.ref}: blob {digest} is missing from the registry") from None

    def get_blob(self, digest: str, max_size: int) -> bytes:
        try:
            return self.client.get_blob(self.ref, digest, max_size)
        except NotFoundError:
            raise TransportError(f"image {self.ref}: blob {digest} is missing from the registry") from None

    def has_blob(self, digest: str) -> bool:
        try:
            self.client.read_range(self.ref, digest, 0, 1)
        except NotFoundError:
            return False
        except ALSError:
            return False
        return True

    def push_blob(self, data: BinaryIO, digest: str, size: int) -> None:
        self.client.push_blob(self.ref, data, digest, size)

    def put_manifest(self, data: bytes, media_type: str, *, tagged: bool) -> str:
        if tagged and not self.ref.tag:
            raise TransportError(f"destination {self.ref} needs a tag")
        reference = self.ref.tag if tagged else sha256_digest(data)
        return self.client.put_manifest(self.ref, data, media_type, reference)


class _VerifyingFile:
    """A blob file whose digest is checked when it has been read to its end."""

    def __init__(self, path: Path, digest: str):
        self._f = open(path, "rb")
        self._digest = digest
        self._hash = hashlib.sha256()
        self._done = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hash.update(data)
        if not data or n < 0:
            self._check()
        return data

    def _check(self) -> None:
        if not self._done:
            self._done = True
            if "sha256:" + self._hash.hexdigest() != self._digest:
                raise VerificationError(f"blob {self._digest} in the OCI layout does not match its digest")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_VerifyingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class OCILayout:
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``)."""

    root: Path
    tag: str = ""

    def __str__(self) -> str:
        return f"oci:{self.root}" + (f":{self.tag}" if self.tag else "")

    def _blob_path(self, digest: str) -> Path:
        if not is_sha256(digest):
            raise TransportError(f"{self}: unsupported digest {digest!r:.100}")
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def _index(self) -> dict:
        try:
            doc = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        except (OSError, ValueError) as e:
            raise TransportError(f"{self}: cannot read index.json: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise TransportError(f"{self}: index.json is not an OCI index")
        return doc

    def get_manifest(self, reference: str | None = None) -> Manifest:
        if reference is None:
            entries = self._index().get("manifests", [])
            if self.tag:
                found = [m for m in entries if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == self.tag]
            else:
                found = entries
            if len(found) != 1:
                tags = sorted({(m.get("annotations") or {}).get(REF_NAME_ANNOTATION, "") for m in entries} - {""})
                what = f"no image tagged {self.tag!r}" if self.tag else f"{len(found)} images and no tag was given"
                raise TransportError(f"{self}: {what} (tags: {', '.join(tags) or 'none'})")
            reference = found[0].get("digest", "")
        data = self.get_blob(reference, 4 << 20)
        media_type = ""
        try:
            media_type = json.loads(data).get("mediaType", "")
        except (ValueError, AttributeError):
            pass
        return Manifest(data=data, media_type=media_type, digest=reference)

    def open_blob(self, digest: str) -> BinaryIO:
        path = self._blob_path(digest)
        if not path.is_file():
            raise TransportError(f"{self}: blob {digest} is missing")
        return _VerifyingFile(path, digest)  # type: ignore[return-value]

    def get_blob(self, digest: str, max_size: int) -> bytes:
        path = self._blob_path(digest)
        try:
            if path.stat().st_size > max_size:
                raise TransportError(f"{self}: blob {digest} is larger than {max_size} bytes")
            data = path.read_bytes()
        except OSError:
            raise TransportError(f"{self}: blob {digest} is missing") from None
        if sha256_digest(data) != digest:
            raise VerificationError(f"{self}: blob {digest} does not match its digest")
        return data

    def has_blob(self, digest: str) -> bool:
        return self._blob_path(digest).is_file()

    def push_blob(self, data: BinaryIO, digest: str, size: int) -> None:
        path = self._blob_path(digest)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            h = hashlib.sha256()
            n = 0
            with os.fdopen(fd, "wb") as out:
                while piece := data.read(1 << 20):
                    out.write(piece)
                    h.update(piece)
                    n += len(piece)
            if "sha256:" + h.hexdigest() != digest or n != size:
                raise VerificationError(f"{self}: blob written as {digest} does not match it")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        marker = self.root / "oci-layout"
        if not marker.exists():
            marker.write_bytes(_LAYOUT_FILE)

    def put_manifest(self, data: bytes, media_type: str, *, tagged: bool) -> str:
        digest = sha256_digest(data)
        self.push_blob(_BytesReader(data), digest, len(data))
        if not tagged:
            return digest
        index = self._index()
        entry = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if self.tag:
            entry["annotations"] = {REF_NAME_ANNOTATION: self.tag}
            index["manifests"] = [m for m in index.get("manifests", [])
                                  if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != self.tag]
        index.setdefault("manifests", []).append(entry)
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", OCI_INDEX)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-")
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.replace(tmp, self.root / "index.json")
        return digest


class _BytesReader:
    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out
