"""A seekable index for an ordinary gzip layer: read it, check it, and inflate a span from its checkpoint.

An ordinary gzip layer is one deflate stream, so a byte in the middle can
only be had by inflating everything before it. The index (written by
``gzindex_writer``, described in docs/gzindex.md) lists checkpoints every few
MiB of uncompressed data: where the deflate stream can be resumed (a byte
offset and a bit within it) and the 32 KiB of data the stream may refer back
to there. With it, a file's bytes cost one range request from the checkpoint
before them and inflating one span. Python's zlib cannot prime a bit buffer
(zlib's ``inflatePrime``), so a span that starts inside a byte gets a few
empty deflate blocks in front of it instead (``resume_stream``).

The index is a separate blob that the layer's annotation names by digest, so
it is trusted only as far as that digest goes: every offset, size, window and
digest in it is checked here before a chunk is built, and each file piece is
checked against its own digest before it is served (by the chunk fetcher, as
for any format). The span digests are `als index`'s check of what it wrote;
the store does not wait for a whole span to check one.
"""

from __future__ import annotations

import base64
import bisect
import json
import zlib
from dataclasses import dataclass

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.formats import toc
from als.formats.tocentries import CHUNK, MAX_CHUNK, MAX_CHUNK_SPAN, MAX_INT64, checked_fields, climbs, toc_entry

VERSION = 1
MEDIA_TYPE = "application/vnd.als.gzip-index.v1+json+gzip"
WINDOW = 32768  # deflate's history: what a checkpoint must carry to resume
MAX_SPAN = MAX_CHUNK  # uncompressed bytes of one span: it is inflated and held whole
MAX_INDEX_JSON = 256 << 20  # the index JSON, inflated
MAX_CHECKPOINTS = 1 << 16  # 128 GiB of tar at 2 MiB spans; each window is inflated once to be checked
# What one cold read fetches and inflates at most, against index size: on the python test image a
# Podman 4.3.1 `python3 -c 'print(1)'` fetched 14.9 MB at 4 MiB spans (index 1.2% of the layer),
# 9.2 MB at 2 MiB (2.1%), 6.9 MB at 1 MiB (3.5%); eStargz about 5.5 MB (docs/gzindex.md).
DEFAULT_SPAN = 2 << 20


@dataclass(frozen=True)
class Checkpoint:
    """Where span ``i`` starts: compressed byte and bit, uncompressed offset; and what it needs."""

    offset: int  # the blob byte holding the span's first bit
    bit: int  # 0-7: bits of that byte that belong to the previous span (deflate is LSB-first)
    uncompressed_offset: int
    digest: str  # sha256 of the span's uncompressed bytes
    window: bytes  # the WINDOW bytes before uncompressed_offset (fewer at the start), raw-deflate compressed


@dataclass
class GzipIndex:
    """A parsed, checked index: the layer's TOC (chunks cut at span boundaries) and its diff size."""

    toc: toc.TOC
    uncompressed_size: int
    checkpoints: list[Checkpoint]
    span_size: int


# --------------------------------------------------------------------------
# Inflating a span
# --------------------------------------------------------------------------


def _bits(fields: list[tuple[int, int]]) -> tuple[int, int]:
    """Pack (value, width) fields LSB-first, as deflate does; returns (the bits as an int, their count)."""
    value = count = 0
    for field, width in fields:
        value |= field << count
        count += width
    return value, count


# Deflate blocks that produce no output, to prime the decoder's bit position (see ``resume_stream``).
# A fixed-Huffman block holding only its end code: BFINAL 0, BTYPE 01, the 7-bit code 0. 10 bits.
_EMPTY_FIXED = [(0, 1), (1, 2), (0, 7)]
# A dynamic-Huffman block holding only its end code, 93 bits: 257 literal/length codes of which only
# end-of-block has a length (1), one distance code (length 1), and the code-length alphabet {1, 18},
# both of length 1 (so '0' means 1 and '1' means 18), its 19 lengths in deflate's permuted order.
_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
_EMPTY_DYNAMIC = ([(0, 1), (2, 2), (0, 5), (0, 5), (15, 4)]
                  + [(1 if sym in (1, 18) else 0, 3) for sym in _ORDER]
                  + [(1, 1), (138 - 11, 7), (1, 1), (118 - 11, 7), (0, 1)]  # 256 zero lengths, then 1 for EOB
                  + [(0, 1)]  # the distance code's length: 1
                  + [(0, 1)])  # the block's data: end of block


def _preamble(bit: int) -> tuple[int, int]:
    """Empty blocks whose length in bits is ``bit`` modulo 8 (10 bits each fixed one, 93 the dynamic one)."""
    if bit % 2:
        fields = _EMPTY_DYNAMIC + _EMPTY_FIXED * (((bit - 5) % 8) // 2)
    else:
        fields = _EMPTY_FIXED * (bit // 2)
    return _bits(fields)


def resume_stream(data: bytes | memoryview, bit: int) -> bytes:
    """Raw deflate data that inflates to what ``data`` holds from bit ``bit`` of its first byte on.

    zlib's ``inflatePrime`` would put the first byte's remaining bits in the
    decoder; Python's zlib has no such call. Shifting the whole stream by
    ``bit`` bits is not enough: a stored block pads to the next byte boundary
    of the original stream, which a shifted stream would misplace. So the
    bytes are kept where they are, and the first byte's low ``bit`` bits are
    replaced by the end of a few deflate blocks that produce nothing, whose
    length in bits is ``bit`` modulo 8: the decoder then reaches bit ``bit``
    of that byte exactly at its place in the stream.
    """
    if not 0 <= bit < 8:
        raise FormatError(f"bit offset {bit} is not 0-7")
    if not bit or not len(data):
        return bytes(data)
    value, count = _preamble(bit)
    full = count // 8  # whole bytes of the preamble; its last count % 8 == bit bits share data[0]
    head = (value & ((1 << (full * 8)) - 1)).to_bytes(full, "little")
    low = value >> (full * 8)
    first = (data[0] & (0xFF << bit) & 0xFF) | low
    return head + bytes([first]) + bytes(data[1:])


def inflate_span(data: bytes | memoryview, bit: int, window: bytes, size: int) -> bytes:
    """Exactly ``size`` bytes inflated from raw deflate data starting ``bit`` bits into ``data``.

    Never inflates more than ``size`` bytes, so a lying index costs at most
    what it claims. Too little output, or corrupt data, raises FormatError.
    zlib, not ISA-L: a span's range ends inside the next span's first block,
    and zlib stops at ``size`` bytes where ISA-L decodes on into that cut
    block and fails.
    """
    d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
    try:
        out = d.decompress(resume_stream(data, bit), size)
    except zlib.error as e:
        raise FormatError(f"corrupt deflate data at the checkpoint: {e}") from None
    if len(out) != size:
        raise FormatError(f"the span inflates to {len(out)} bytes, the index says {size}")
    return out


class SpanInflater:
    """One span inflated from its checkpoint as its compressed bytes arrive, never past its size.

    The chunk fetcher streams a span's range and hands each file piece out as
    soon as it is inflated, after checking it against the piece's own digest
    (every piece has one): a small file near a checkpoint is served long
    before the span's last byte is in, and no span is ever held whole. Output
    before ``drop_before`` is let go, so memory is the pieces still to come.
    """

    def __init__(self, span: toc.Span, limit: int | None = None):
        window = unpack_window(span.window)
        self._d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
        self._bit: int | None = span.bit  # until the first byte is in
        self.size = span.size
        self._limit = span.size if limit is None else min(limit, span.size)  # inflate no further
        self.produced = 0  # span bytes inflated so far
        self._out = bytearray()
        self._out_start = 0  # span offset of _out[0]

    def feed(self, data: bytes | memoryview) -> None:
        """Inflate what ``data`` (the next compressed bytes of the span) holds; FormatError if corrupt."""
        if self.produced >= self._limit or not len(data):
            return
        if self._bit is not None:
            data, self._bit = resume_stream(data, self._bit), None
        try:
            out = self._d.decompress(data, self._limit - self.produced)
        except zlib.error as e:
            raise FormatError(f"corrupt deflate data in the span: {e}") from None
        self.produced += len(out)
        self._out += out

    def piece(self, start: int, size: int) -> bytes | None:
        """Span bytes [start, start + size) once inflated, else None (more input needed)."""
        if start < self._out_start or start + size > self.size:
            raise FormatError(f"bad chunk bounds: inner offset {start}, size {size}, span {self.size}")
        if start + size > self.produced:
            return None
        return bytes(self._out[start - self._out_start:start + size - self._out_start])

    def drop_before(self, start: int) -> None:
        """Nothing before span offset ``start`` is asked for again: let it go."""
        cut = min(start, self.produced) - self._out_start
        if cut > 0:
            del self._out[:cut]
            self._out_start += cut

    def shortfall(self) -> str:
        """Why the span ended short, for the log, once its compressed bytes are all in."""
        return f"the span inflates to {self.produced} bytes, the index says {self.size}"


def decompress_chunk(data: bytes | memoryview, chunk: toc.Chunk) -> bytes:
    """The chunk's bytes from its span's compressed range (``[blob_start, blob_end)``).

    The span is inflated from its checkpoint only as far as the chunk's end;
    the caller checks the chunk's own digest, as for any format, and nothing
    of the span is used without that check. (The chunk fetcher streams spans
    through ``SpanInflater`` instead, one inflate for all of a span's files.)
    """
    span = chunk.span
    if span is None:
        raise FormatError(f"chunk at blob offset {chunk.blob_start} has no checkpoint")
    if chunk.size <= 0 or chunk.inner_offset < 0 or chunk.inner_offset + chunk.size > span.size:
        raise FormatError(f"bad chunk bounds: inner offset {chunk.inner_offset}, size {chunk.size}, "
                          f"span {span.size}")
    inflater = SpanInflater(span, chunk.inner_offset + chunk.size)
    inflater.feed(data)
    piece = inflater.piece(chunk.inner_offset, chunk.size)
    if piece is None:
        raise FormatError(inflater.shortfall())
    return piece


# --------------------------------------------------------------------------
# Reading an index
# --------------------------------------------------------------------------


def _int(obj: dict, key: str, what: str, low: int = 0, high: int = MAX_INT64) -> int:
    value = obj.get(key)
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"{what}: {key!r} = {value!r:.80} is not an integer in [{low}, {high}]")
    return value


def _digest(value: object, what: str) -> str:
    if not is_sha256(value):
        raise FormatError(f"{what} {value!r:.100} is not a sha256:<64 hex> digest")
    return value  # type: ignore[return-value]


def _inflate_json(blob: bytes) -> bytes:
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(blob, MAX_INDEX_JSON)
    except zlib.error as e:
        raise FormatError(f"gzip index is not gzip data: {e}") from None
    if d.unconsumed_tail:
        raise FormatError(f"gzip index inflates to more than {MAX_INDEX_JSON} bytes")
    if not d.eof or d.unused_data:
        raise FormatError("gzip index is truncated or has trailing data")
    return out


def unpack_window(packed: bytes, want: int = WINDOW) -> bytes:
    """A window from the raw-deflate form an index keeps it in (in memory too: about a third the size)."""
    if not packed:
        return b""
    d = zlib.decompressobj(-15)
    try:
        window = d.decompress(packed, want + 1)
    except zlib.error as e:
        raise FormatError(f"window does not inflate: {e}") from None
    if len(window) > want or not d.eof:
        raise FormatError(f"window is over {want} bytes")
    return window


def _window(text: object, want: int, what: str) -> bytes:
    """A checkpoint's window as kept: base64-decoded, and checked to inflate to exactly ``want`` bytes."""
    if not isinstance(text, str):
        raise FormatError(f"{what}: window is not a base64 string")
    try:
        packed = base64.b64decode(text, validate=True)
    except ValueError:
        raise FormatError(f"{what}: window is not valid base64") from None
    try:
        size = len(unpack_window(packed))
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    if size != want:
        raise FormatError(f"{what}: window is {size} bytes, want {want}")
    return packed


def _checkpoints(doc: dict, blob_size: int, uncompressed: int) -> list[Checkpoint]:
    items = doc.get("checkpoints")
    if not isinstance(items, list) or (uncompressed and not items):
        raise FormatError("gzip index 'checkpoints' is not a non-empty list")
    if len(items) > min(MAX_CHECKPOINTS, uncompressed // 4096 + 1):  # spans are never that small
        raise FormatError(f"gzip index has {len(items)} checkpoints for {uncompressed} bytes")
    out: list[Checkpoint] = []
    for i, item in enumerate(items):
        what = f"gzip index checkpoint {i}"
        if not isinstance(item, dict):
            raise FormatError(f"{what} is not a JSON object")
        offset = _int(item, "offset", what, 0, blob_size - 1)
        bit = _int(item, "bit", what, 0, 7)
        start = _int(item, "uncompressedOffset", what, 0, max(uncompressed - 1, 0))
        if i == 0 and start != 0:
            raise FormatError(f"{what} starts at uncompressed offset {start}, not 0")
        if out:
            prev = out[-1]
            if offset * 8 + bit <= prev.offset * 8 + prev.bit or start <= prev.uncompressed_offset:
                raise FormatError(f"{what} does not follow checkpoint {i - 1}")
            if start - prev.uncompressed_offset > MAX_SPAN:
                raise FormatError(f"span {i - 1} is {start - prev.uncompressed_offset} bytes, over {MAX_SPAN}")
            if offset + 1 - prev.offset > MAX_CHUNK_SPAN:
                raise FormatError(f"span {i - 1} is over {MAX_CHUNK_SPAN} bytes compressed")
        window = _window(item.get("window", ""), min(start, WINDOW), what)
        out.append(Checkpoint(offset, bit, start, _digest(item.get("digest"), f"{what}: digest"), window))
    if out and uncompressed - out[-1].uncompressed_offset > MAX_SPAN:
        raise FormatError(f"the last span is {uncompressed - out[-1].uncompressed_offset} bytes, over {MAX_SPAN}")
    if out and blob_size - out[-1].offset > MAX_CHUNK_SPAN:
        raise FormatError(f"the last span is over {MAX_CHUNK_SPAN} bytes compressed")
    return out


def _spans(points: list[Checkpoint], blob_size: int, uncompressed: int) -> list[tuple[int, int, int, toc.Span]]:
    """Per checkpoint: (uncompressed start, compressed start, compressed end, the Span chunks carry)."""
    out = []
    for i, p in enumerate(points):
        if i + 1 < len(points):
            nxt = points[i + 1]
            end, u_end = nxt.offset + (1 if nxt.bit else 0), nxt.uncompressed_offset
        else:
            end, u_end = blob_size, uncompressed
        out.append((p.uncompressed_offset, p.offset, end, toc.Span(p.bit, p.window, u_end - p.uncompressed_offset,
                                                                   p.digest)))
    return out


def _attach(entry: toc.Entry, obj: dict, index: int, spans: list, starts: list[int], uncompressed: int) -> int:
    """Cut regular file ``entry`` at span boundaries into chunks; returns where its content ends."""
    what = f"gzip index entry {index} ({entry.name!r:.300})"
    start = obj["offset"]  # checked by the caller
    if entry.size > uncompressed - start:
        raise FormatError(f"{what}: {entry.size} bytes at offset {start} run past the stream's "
                          f"{uncompressed} bytes")
    entry.digest = _digest(obj.get("digest"), f"{what}: digest")
    first = bisect.bisect_right(starts, start) - 1
    last = bisect.bisect_right(starts, start + entry.size - 1) - 1
    digests = obj.get("chunkDigests")
    if first == last:
        if digests is not None:
            raise FormatError(f"{what}: chunkDigests for a file within one span")
        digests = [entry.digest]
    elif not isinstance(digests, list) or len(digests) != last - first + 1:
        raise FormatError(f"{what}: the file crosses {last - first + 1} spans, so it needs as many chunkDigests")
    position = start
    for n, i in enumerate(range(first, last + 1)):
        u_start, c_start, c_end, span = spans[i]
        piece_end = min(start + entry.size, u_start + span.size)
        entry.chunks.append(toc.Chunk(position - start, piece_end - position, c_start, c_end,
                                      _digest(digests[n], f"{what}: chunk digest {n}"),
                                      position - u_start, False, span))
        position = piece_end
    return start + entry.size


def parse_index(blob: bytes, expected_digest: str, *, layer_digest: str, layer_size: int,
                max_size: int, max_entries: int, diff_id: str | None = None) -> GzipIndex:
    """Verify and parse the index blob of layer ``layer_digest`` (``layer_size`` bytes compressed).

    The blob must hash to ``expected_digest`` (the layer annotation's) before
    it is inflated, and must name this very layer: its blob digest and size,
    and its DiffID, which must be ``diff_id`` (the image config's) when given.
    Podman >= 5.1 keys the layer by the index digest, so the index must
    commit to what the layer holds. Every refusal is a FormatError
    (VerificationError for a digest) in words for the log.
    """
    if len(blob) > max_size:
        raise FormatError(f"gzip index is {len(blob)} bytes, over the {max_size} limit")
    digest = sha256_digest(blob)
    if digest != expected_digest:
        raise VerificationError(f"gzip index digest is {digest}, the manifest says {expected_digest}")
    try:
        doc = json.loads(_inflate_json(blob))
    except (ValueError, RecursionError) as e:
        raise FormatError(f"gzip index is not valid JSON: {e}") from None
    items = toc.entry_list(doc, "gzip index", max_entries)  # checks the version too
    layer = doc.get("layer")
    if not isinstance(layer, dict) or layer.get("digest") != layer_digest or layer.get("size") != layer_size:
        raise FormatError(f"gzip index is for layer {layer!r:.200}, not {layer_digest} ({layer_size} bytes)")
    indexed_diff_id = _digest(layer.get("diffID"), "gzip index layer diffID")
    if diff_id is not None and indexed_diff_id != diff_id:
        raise FormatError(f"gzip index is for a layer with DiffID {indexed_diff_id}, the image config says {diff_id}")
    uncompressed = _int(doc, "uncompressedSize", "gzip index")
    span_size = _int(doc, "spanSize", "gzip index", 1, MAX_SPAN)
    points = _checkpoints(doc, layer_size, uncompressed)
    spans = _spans(points, layer_size, uncompressed)
    starts = [s[0] for s in spans]
    entries: list[toc.Entry] = []
    content_end = 0
    for i, obj in enumerate(items):
        get = checked_fields(obj, i).get
        name, kind = get("name", ""), get("type", "")
        if kind == CHUNK:
            raise FormatError(f"gzip index entry {i}: chunk entries are not part of this format")
        if climbs(name) or (kind == toc.HARDLINK and climbs(get("linkName", ""))):
            raise FormatError(f"gzip index entry {i} ({name!r:.300}) climbs above the layer root with '..'")
        entry = toc_entry(obj, i)
        if entry.type == toc.REG and entry.size:
            start = _int(obj, "offset", f"gzip index entry {i} ({entry.name!r:.300})", 0, uncompressed)
            if start < content_end:
                raise FormatError(f"gzip index entry {i} ({entry.name!r:.300}) overlaps the file before it "
                                  f"(offset {start}, previous content ends at {content_end})")
            content_end = _attach(entry, obj, i, spans, starts, uncompressed)
        entries.append(entry)
    parsed = toc.TOC(entries=entries, digest=digest, compression=toc.GZIP_SPANS, data_end=layer_size)
    return GzipIndex(parsed, uncompressed, points, span_size)
