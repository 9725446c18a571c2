"""Hand-made eStargz blobs for hostile-input tests: any TOC, any offset, any footer.

`als.formats.estargz_writer.write_estargz` only writes valid layers, so a test that
wants a TOC entry named ``../../etc/passwd``, a chunk that inflates to a
gigabyte or a footer pointing into the middle of a file builds the blob here,
member by member, and pushes it to a real registry like any other layer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field

from als.formats import estargz
from als.tools.image import BuiltLayer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zeros_member(total: int, prefix: bytes = b"", level: int = 9) -> bytes:
    """One gzip member of ``prefix`` + ``total`` zero bytes, compressed in 1 MiB steps (a bomb)."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    parts = [z.compress(prefix)]
    piece = bytes(1 << 20)
    left = total
    while left > 0:
        parts.append(z.compress(piece[:min(left, len(piece))]))
        left -= len(piece)
    parts.append(z.flush())
    return b"".join(parts)


def toc_tar(payload: bytes, *, name: str = estargz.TOC_NAME, declared: int | None = None) -> bytes:
    """The uncompressed TOC member contents: a tar header, the JSON, padding and the tar EOF."""
    info = tarfile.TarInfo(name)
    info.size = len(payload) if declared is None else declared
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512) + bytes(1024)


@dataclass
class RawBlob:
    """A blob assembled from raw pieces; offsets are whatever the test makes them."""

    data: bytearray = field(default_factory=bytearray)

    def raw(self, piece: bytes) -> int:
        """Append bytes as they are; return their offset."""
        offset = len(self.data)
        self.data += piece
        return offset

    def member(self, payload: bytes) -> int:
        """Append ``payload`` as one gzip member; return its offset."""
        return self.raw(gzip.compress(payload, compresslevel=6, mtime=0))

    def file(self, name: str, content: bytes, **fields) -> dict:
        """Append ``content`` as one member and return its (honest) TOC entry; ``fields`` override."""
        entry = {"name": name, "type": "reg", "size": len(content), "offset": self.member(content),
                 "chunkDigest": sha(content), "digest": sha(content), "mode": 0o644}
        entry.update(fields)
        return entry

    def finish(self, doc: dict | bytes, *, toc_member: bytes | None = None, footer_offset: int | None = None,
               toc_digest: str | None = None, footer: bytes | None = None) -> "Built":
        """Append the TOC member and the footer; return the pushable layer.

        ``doc`` is the TOC (a dict, or raw JSON bytes); ``toc_member`` replaces
        the whole compressed TOC member; ``footer_offset`` makes the footer
        point elsewhere; ``toc_digest`` is what the manifest annotation claims
        (default: the true digest of the JSON); ``footer`` replaces the footer.
        """
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        toc_offset = self.raw(toc_member if toc_member is not None else gzip.compress(toc_tar(payload), mtime=0))
        self.raw(footer if footer is not None else
                 estargz.make_footer(toc_offset if footer_offset is None else footer_offset))
        blob = bytes(self.data)
        digest = sha(blob)
        annotations = {estargz.TOC_DIGEST_ANNOTATION: toc_digest or sha(payload),
                       estargz.UNCOMPRESSED_SIZE_ANNOTATION: str(len(blob) * 4)}
        layer = BuiltLayer(blob=io.BytesIO(blob), digest=digest, size=len(blob),
                           diff_id=sha(b"diff of " + blob), annotations=annotations)
        return Built(layer=layer, blob=blob, toc_json=payload)


@dataclass
class Built:
    layer: BuiltLayer
    blob: bytes
    toc_json: bytes

    @property
    def digest(self) -> str:
        return self.layer.digest


def toc(entries: list[dict]) -> dict:
    return {"version": 1, "entries": entries}
