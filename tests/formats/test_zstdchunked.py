"""zstd:chunked: our reader and writer, and Podman's own zstd:chunked served lazily by `als serve`.

The interop test takes layers Podman 4.3.1 itself writes (`podman push
--compression-format zstd:chunked`: old annotation names, content-defined
chunks, zero chunks) and runs a container from them through the store.
Podman 5's layers (current names, a tar-split) come from tests/data/, written
by Podman 5.8.6.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from als.fetch.cache import ChunkCache
from als.errors import FormatError, VerificationError
from als.fetch.fetcher import ChunkFetcher
from als.fetch.source import BlobSource
from als.formats.estargz import TOC_DIGEST_ANNOTATION as ESTARGZ_TOC_DIGEST
from als.formats import lazy
from als.formats import toc as T
from als.formats import zstdchunked as Z
from als.formats import zstdchunked_size as ZS
from als.formats import zstdchunked_writer as ZW
from als.oci import OCI_LAYER_GZIP
from als.store.namespace import LayerUnavailable
from tests.support import images, inprocess
from als.tools.podman import Podman
from als.reference import parse_reference
from tests.support.store_process import StoreProcess
from tests.support.difftree import actual_tree, expected_tree

PODMAN5 = Path(__file__).parents[1] / "data" / "podman5-zstd-chunked"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample_tar() -> bytes:
    return images.layer_tar([
        images.Entry("d", images.DIR, 0o755),
        images.Entry("d/small", images.FILE, 0o644, data=b"hello\n"),
        images.Entry("d/big", images.FILE, 0o755, data=bytes(range(256)) * 2000),  # 512000 bytes, 4 chunks
        images.Entry("d/zeros", images.FILE, 0o644, data=bytes(200_000)),
        images.Entry("d/empty", images.FILE, 0o644, data=b""),
        images.Entry("d/link", images.SYMLINK, 0o777, link="small"),
    ])


def write(tar: bytes, **kw) -> tuple[bytes, ZW.WriteResult]:
    out = io.BytesIO()
    r = ZW.write_zstdchunked(io.BytesIO(tar), out, chunk_size=128 << 10, **kw)
    return out.getvalue(), r


def parse(blob: bytes, annotations: dict) -> T.TOC:
    loc = Z.locate(annotations, len(blob))
    return Z.parse_manifest(blob[loc.offset:loc.offset + loc.length], loc)


def content(blob: bytes, entry: T.Entry) -> bytes:
    return b"".join(bytes(c.size) if c.zeros else Z.decompress_chunk(blob[c.blob_start:c.blob_end], c)
                    for c in entry.chunks)


def test_writer_output_reads_back_and_decompresses_to_its_diff_id():
    tar = sample_tar()
    blob, r = write(tar)
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert sha(raw) == r.diff_id and len(raw) == r.uncompressed_size and sha(blob) == r.blob_digest
    parsed = parse(blob, r.annotations())
    assert parsed.compression == T.ZSTD and parsed.digest == r.toc_digest
    by_name = {e.name: e for e in parsed.entries}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isreg():
                assert content(blob, by_name[m.name]) == tf.extractfile(m).read()
                assert by_name[m.name].digest == (sha(tf.extractfile(m).read()) if m.size else "")
    assert len(by_name["d/big"].chunks) == 4
    assert by_name["d/link"].linkname == "small" and by_name["d/empty"].chunks == []
    # Without the size annotation the store computes the same size from the header frames.
    assert ZS.uncompressed_size(parsed, lambda s, e: blob[s:e]) == len(raw)


def test_writer_annotations_are_read_by_podman_4_and_5():
    """Both spellings, equal: Podman >= 5.1 takes the TOC digest from the current name only (and refuses a
    layer that also has an eStargz TOC digest), Podman 4.3.1's partial pulls read the old names only."""
    blob, r = write(sample_tar())
    ann = r.annotations()
    assert ann[Z.CHECKSUM_ANNOTATION] == ann[Z.OLD_CHECKSUM_ANNOTATION] == r.toc_digest
    assert ann[Z.POSITION_ANNOTATION] == ann[Z.OLD_POSITION_ANNOTATION] == r.manifest_position
    assert "containerd.io/snapshot/stargz/toc.digest" not in ann
    assert int(ann[Z.UNCOMPRESSED_SIZE_ANNOTATION]) == r.uncompressed_size


def test_the_format_is_chosen_by_media_type_and_annotations():
    """What the store serves lazily: eStargz by its gzip media types (open_toc then says what a plain one lacks),
    zstd:chunked only with its annotations; anything else is declined with the reason the log shows."""
    _, r = write(sample_tar())
    ann = r.annotations()
    assert lazy.format_for(Z.MEDIA_TYPE, ann) is lazy.ZSTD_CHUNKED
    assert lazy.format_for(OCI_LAYER_GZIP, {}) is lazy.ESTARGZ
    assert lazy.format_for(Z.MEDIA_TYPE, {}) is None
    assert lazy.unserved_reason(Z.MEDIA_TYPE) == "a zstd layer without zstd:chunked annotations is not served lazily"
    assert lazy.format_for("application/vnd.oci.image.layer.v1.tar", ann) is None
    assert lazy.unserved_reason("") == "media type (none) is not served lazily"
    assert (lazy.for_compression(T.ZSTD), lazy.for_compression(T.GZIP), lazy.for_compression("lz4")) == (
        lazy.ZSTD_CHUNKED, lazy.ESTARGZ, None)
    assert (lazy.ZSTD_CHUNKED.storage_compression, lazy.ESTARGZ.storage_compression) == (4, 2)
    # The TOC digest under any spelling, the current one first; an eStargz one before either.
    old = {Z.OLD_CHECKSUM_ANNOTATION: "sha256:" + "a" * 64}
    assert lazy.toc_digest(old) == old[Z.OLD_CHECKSUM_ANNOTATION] and lazy.toc_digest(ann) == r.toc_digest
    assert lazy.toc_digest(dict(ann, **{ESTARGZ_TOC_DIGEST: "sha256:" + "c" * 64})) == "sha256:" + "c" * 64
    assert lazy.toc_digest({}) == ""


def test_old_only_annotations_gain_the_current_names():
    old = {Z.OLD_CHECKSUM_ANNOTATION: "sha256:" + "a" * 64, Z.OLD_POSITION_ANNOTATION: "10:20:30:1", "x": "y"}
    assert Z.with_current_names(old) == dict(old, **{Z.CHECKSUM_ANNOTATION: old[Z.OLD_CHECKSUM_ANNOTATION],
                                                     Z.POSITION_ANNOTATION: "10:20:30:1"})
    current = dict(old, **{Z.CHECKSUM_ANNOTATION: "sha256:" + "b" * 64})
    assert Z.with_current_names(current) == current  # one writer's names are never mixed with another's
    esgz = dict(old, **{"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "c" * 64})
    assert Z.with_current_names(esgz) == esgz  # Podman 5 refuses a layer with both TOC digests


def test_both_annotation_spellings_locate_the_same_toc():
    blob, r = write(sample_tar())
    old = {k: v for k, v in r.annotations().items() if not k.startswith("io.github.")}
    new = {k.replace("io.containers.", "io.github.containers."): v for k, v in old.items()
           if k.startswith("io.containers.zstd-chunked.")}
    a, b = parse(blob, old), parse(blob, new)
    assert [(e.name, e.chunks) for e in a.entries] == [(e.name, e.chunks) for e in b.entries]
    # The current names win when both are there, so a wrong new checksum is caught.
    both = dict(old, **{k: (sha(b"other") if k.endswith("checksum") else v) for k, v in new.items()})
    with pytest.raises(VerificationError):
        parse(blob, both)


def test_hostile_tocs_are_refused():
    blob, r = write(sample_tar())
    ann = {k: v for k, v in r.annotations().items() if not k.startswith("io.github.")}
    off, length, size, kind = (int(x) for x in ann[Z.OLD_POSITION_ANNOTATION].split(":"))
    with pytest.raises(VerificationError):
        parse(blob, dict(ann, **{Z.OLD_CHECKSUM_ANNOTATION: sha(b"x")}))
    with pytest.raises(FormatError, match="outside"):
        Z.locate(dict(ann, **{Z.OLD_POSITION_ANNOTATION: f"{off}:{len(blob)}:{size}:1"}), len(blob))
    with pytest.raises(FormatError, match="type 2"):
        Z.locate(dict(ann, **{Z.OLD_POSITION_ANNOTATION: f"{off}:{length}:{size}:2"}), len(blob))
    # A manifest that decompresses to more than it claims is cut off and refused.
    loc = Z.locate(dict(ann, **{Z.OLD_POSITION_ANNOTATION: f"{off}:{length}:{size - 10}:1"}), len(blob))
    with pytest.raises(FormatError, match="decompresses to"):
        Z.parse_manifest(blob[off:off + length], loc)
    # A chunk range past the data is refused.
    doc = json.loads(zstandard.ZstdDecompressor().decompress(blob[off:off + length], max_output_size=size))
    next(e for e in doc["entries"] if e["name"] == "d/small")["endOffset"] = off + 100
    bad = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    loc = Z.ManifestLocation(checksum=sha(bad), offset=off, length=len(bad), uncompressed_length=len(json.dumps(doc)))
    with pytest.raises(FormatError, match="outside the data"):
        Z.parse_manifest(bad, loc)


def test_a_manifest_over_the_entry_limit_is_refused_before_its_entries_are_built():
    blob, r = write(sample_tar())
    loc = Z.locate(r.annotations(), len(blob))
    data = blob[loc.offset:loc.offset + loc.length]
    items = json.loads(zstandard.ZstdDecompressor().decompress(data, max_output_size=loc.uncompressed_length))
    entries = len(items["entries"])
    assert {e.name for e in Z.parse_manifest(data, loc, max_entries=entries).entries} >= {"d/big", "d/link"}
    with pytest.raises(FormatError, match=f"zstd:chunked manifest has {entries} entries, over the limit of "
                                          f"{entries - 1}"):
        Z.parse_manifest(data, loc, max_entries=entries - 1)


def test_the_store_declines_a_zstd_chunked_layer_over_max_toc_entries(registry, client, registries_conf,
                                                                      tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    under = {f"f{i}": os.urandom(100) for i in range(4)}
    over = {f"f{i}": os.urandom(100) for i in range(5)}  # one entry per small file
    ref_under, ref_over = f"{registry.host}/zstd/limit:under", f"{registry.host}/zstd/limit:over"
    layer_under = images.push_zstd_files(client, ref_under, under, chunk_size=64 << 10)
    layer_over = images.push_zstd_files(client, ref_over, over, chunk_size=64 << 10)
    config = "[resolve]\nmax_toc_entries = 4\n[fetch]\nbackground = false\npredict = false\n"
    with inprocess.store(tmp_path, registries_conf, config) as s:
        with pytest.raises(LayerUnavailable) as e:
            s.layer(ref_over, layer_over.digest)
        assert e.value.errno == errno.EIO
        assert (f"image {ref_over} layer {layer_over.digest}: declined: zstd:chunked manifest has 5 entries, "
                "over the limit of 4") in caplog.text
        served = s.layer(ref_under, layer_under.digest)
        assert {name: inprocess.read_file(s, served, name) for name in under} == under


def test_zero_chunks_are_synthesised_without_a_fetch(tmp_path):
    """A chunk marked "zeros" (Podman writes them for long zero runs) is never fetched."""
    blob, r = write(sample_tar())
    ann = {k: v for k, v in r.annotations().items() if not k.startswith("io.github.")}
    off, length, size, _ = (int(x) for x in ann[Z.OLD_POSITION_ANNOTATION].split(":"))
    doc = json.loads(zstandard.ZstdDecompressor().decompress(blob[off:off + length], max_output_size=size))
    for entry in doc["entries"]:
        if entry["name"] == "d/zeros":
            entry["chunkType"] = "zeros"
    data = json.dumps(doc).encode()
    compressed = zstandard.ZstdCompressor().compress(data)
    loc = Z.ManifestLocation(checksum=sha(compressed), offset=off, length=len(compressed),
                             uncompressed_length=len(data))
    zeros = {e.name: e for e in Z.parse_manifest(compressed, loc).entries}["d/zeros"]
    assert [c.zeros for c in zeros.chunks] == [True, True]
    fetched = []
    source = BlobSource("test layer", lambda s, e: fetched.append((s, e)) or blob[s:e], T.ZSTD, zeros.chunks)
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"))
    assert b"".join(fetcher.read(source, zeros.chunks)) == bytes(200_000)
    assert fetched == []


def test_size_computation_is_bounded():
    blob, r = write(sample_tar())
    parsed = parse(blob, r.annotations())
    with pytest.raises(FormatError, match="requests"):
        ZS.uncompressed_size(parsed, lambda s, e: blob[s:e], max_requests=1, merge_gap=0)


# ---- the tar-split (Podman 5) --------------------------------------------------------------

def podman5_layer() -> tuple[bytes, dict, T.TOC]:
    """The layer Podman 5.8.6 wrote (tests/data), its manifest descriptor and its parsed TOC."""
    blob = (PODMAN5 / "layer.zst").read_bytes()
    [desc] = json.loads((PODMAN5 / "manifest.json").read_bytes())["layers"]
    return blob, desc, parse(blob, desc["annotations"])


def decompressed(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def file_bytes(parsed: T.TOC) -> int:
    return sum(e.size for e in parsed.entries if e.type == T.REG)


def test_tar_split_of_a_podman5_layer_gives_its_exact_size():
    blob, desc, parsed = podman5_layer()
    raw = decompressed(blob)
    diff_id = json.loads((PODMAN5 / "config.json").read_bytes())["rootfs"]["diff_ids"][0]
    assert sha(raw) == diff_id and sha(blob) == desc["digest"]
    assert Z.OLD_CHECKSUM_ANNOTATION not in desc["annotations"]  # Podman 5 writes only the current names
    where = ZS.locate_tar_split(desc["annotations"], len(blob), parsed)
    assert where.digest == parsed.tar_split_digest  # the TOC vouches for it
    data = blob[where.offset:where.offset + where.length]
    assert ZS.tar_split_size(data, where, file_bytes=file_bytes(parsed)) == len(raw) == 1_423_360


def tar_split(entries: list[dict]) -> tuple[bytes, ZS.TarSplitLocation]:
    """A hand-made tar-split (JSON lines, zstd) and a location vouching for it."""
    raw = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
    data = zstandard.ZstdCompressor().compress(raw)
    return data, ZS.TarSplitLocation(offset=0, length=len(data), uncompressed_length=len(raw), digest=sha(data))


def segment(data: bytes) -> dict:
    return {"type": 2, "payload": base64.b64encode(data).decode(), "position": 0}


def test_hand_made_tar_split_sums_segments_and_file_sizes():
    data, where = tar_split([segment(b"h" * 512), {"type": 1, "name": "f", "size": 700, "payload": None},
                             segment(bytes(324 + 1024))])
    assert ZS.tar_split_size(data, where, file_bytes=700) == 512 + 700 + 324 + 1024


@pytest.mark.parametrize("case, error", [
    ("digest", VerificationError),
    ("inflates more", "more than"),
    ("inflates less", "inflates to"),
    ("not json", "not valid JSON"),
    ("unknown type", "unknown type"),
    ("negative size", "non-negative"),
    ("bad base64", "not base64"),
    ("file sizes differ from the TOC", "bytes of file content"),
    ("not zstd", "corrupt zstd"),
])
def test_hostile_tar_splits_are_refused(case, error):
    good = [segment(b"h" * 512), {"type": 1, "name": "f", "size": 700}, segment(bytes(1024))]
    data, where = tar_split(good)
    expected_files = 700
    if case == "digest":
        where = dataclasses.replace(where, digest=sha(b"other"))
    elif case == "inflates more":
        where = dataclasses.replace(where, uncompressed_length=where.uncompressed_length - 1)
    elif case == "inflates less":
        where = dataclasses.replace(where, uncompressed_length=where.uncompressed_length + 1)
    elif case == "not json":
        data, where = tar_split(good)
        raw = b"{not json}\n"
        data = zstandard.ZstdCompressor().compress(raw)
        where = ZS.TarSplitLocation(0, len(data), len(raw), sha(data))
    elif case == "unknown type":
        data, where = tar_split(good + [{"type": 3}])
    elif case == "negative size":
        data, where = tar_split([{"type": 1, "name": "f", "size": -5}])
    elif case == "bad base64":
        data, where = tar_split([{"type": 2, "payload": "!!!!"}])
    elif case == "file sizes differ from the TOC":
        expected_files = 701
    elif case == "not zstd":
        data = b"plain bytes, not a zstd frame"
        where = ZS.TarSplitLocation(0, len(data), 100, sha(data))
    with pytest.raises(FormatError if isinstance(error, str) else error, match=error if isinstance(error, str) else None):
        ZS.tar_split_size(data, where, file_bytes=expected_files)


def test_tar_split_location_is_checked_before_any_read():
    blob, desc, parsed = podman5_layer()
    ann = desc["annotations"]
    off, length, size = (int(x) for x in ann[Z.TAR_SPLIT_POSITION_ANNOTATION].split(":"))
    for position, error in ((f"{off}:{len(blob)}:{size}", "outside"),  # past the end of the blob
                            (f"100:{length}:{size}", "outside"),  # inside the file data
                            (f"{off}:{length}:{2 << 30}", "exceeds the limits"),  # a bomb, by its own word
                            (f"{off}:{length}", "not offset:length:size")):
        with pytest.raises(FormatError, match=error):
            ZS.locate_tar_split(dict(ann, **{Z.TAR_SPLIT_POSITION_ANNOTATION: position}), len(blob), parsed)
    with pytest.raises(FormatError, match="no io.github.containers.zstd-chunked.tarsplit-position"):
        ZS.locate_tar_split({}, len(blob), parsed)
    # A tar-split nothing vouches for is not used (as containers/storage ignores it) ...
    unvouched = dataclasses.replace(parsed, tar_split_digest="")
    with pytest.raises(FormatError, match="nothing vouches"):
        ZS.locate_tar_split(ann, len(blob), unvouched)
    # ... unless an older writer's checksum annotation does.
    where = ZS.locate_tar_split(dict(ann, **{Z.TAR_SPLIT_CHECKSUM_ANNOTATION: parsed.tar_split_digest}),
                               len(blob), unvouched)
    assert ZS.tar_split_size(blob[where.offset:where.offset + where.length], where) == 1_423_360


def push_podman5_image(client, ref: str, annotations: dict | None = None) -> dict:
    """Push the Podman 5.8.6 image from tests/data as ``ref`` (optionally with other layer annotations)."""
    r = parse_reference(ref)
    manifest = json.loads((PODMAN5 / "manifest.json").read_bytes())
    for name, desc in (("layer.zst", manifest["layers"][0]), ("config.json", manifest["config"])):
        data = (PODMAN5 / name).read_bytes()
        client.push_blob(r, data, desc["digest"], len(data))
    if annotations is not None:
        manifest["layers"][0]["annotations"] = annotations
    client.put_manifest(r, json.dumps(manifest).encode(), manifest["mediaType"])
    return manifest["layers"][0]


def test_store_takes_diff_size_from_the_tar_split_in_one_read(tmp_path, registry, client, registries_conf):
    """The store's `info` has the exact size, from one read of the tar-split (the registry's log says so);
    without a usable tar-split it falls back to the header frames, says why, and gets the same size."""
    raw_size = len(decompressed((PODMAN5 / "layer.zst").read_bytes()))
    config = "[fetch]\nbackground = false\npredict = false\n"  # only the resolve's reads reach the registry
    with StoreProcess(tmp_path, registries_conf=registries_conf, config=config) as store:
        ref = f"{registry.host}/p5/small:tarsplit"
        desc = push_podman5_image(client, ref)
        mark = registry.mark()
        info = json.loads((store.layer_dir(ref, desc["digest"]) / "info").read_bytes())
        reads = [a.written for a in registry.accesses_since(mark) if desc["digest"] in a.uri]
        toc_length = int(desc["annotations"][Z.POSITION_ANNOTATION].split(":")[1])
        tar_split_length = int(desc["annotations"][Z.TAR_SPLIT_POSITION_ANNOTATION].split(":")[1])
        assert info["diff-size"] == raw_size
        # The TOC, then the tar-split. A new store may also have read the tail of the first layer looked
        # up while the manifest was fetched (an eStargz layer's TOC is there): a zstd:chunked layer's is
        # not, so such a guess is the store's last (als/store/early.py).
        guessed = min(desc["size"], 512 << 10)
        assert sorted(reads) in (sorted([toc_length, tar_split_length]),
                                 sorted([guessed, toc_length, tar_split_length])), reads
        assert "comes from its tar-split" in store.log()

        # No tar-split annotation: the header frames (more requests), and the log says why.
        plain = {k: v for k, v in desc["annotations"].items() if k != Z.TAR_SPLIT_POSITION_ANNOTATION}
        ref = f"{registry.host}/p5/small:plain"
        push_podman5_image(client, ref, plain)
        mark = registry.mark()
        info = json.loads((store.layer_dir(ref, desc["digest"]) / "info").read_bytes())
        reads = [a.written for a in registry.accesses_since(mark) if desc["digest"] in a.uri]
        assert info["diff-size"] == raw_size and len(reads) > 1 and tar_split_length not in reads
        assert "from its header frames" in store.log() and "(it has no tar-split)" in store.log()

        # A tar-split position that does not match what the TOC vouches for: refused, logged, same fallback.
        off, length, size = desc["annotations"][Z.TAR_SPLIT_POSITION_ANNOTATION].split(":")
        lying = dict(desc["annotations"], **{Z.TAR_SPLIT_POSITION_ANNOTATION: f"{off}:{int(length) - 1}:{size}"})
        ref = f"{registry.host}/p5/small:lying"
        push_podman5_image(client, ref, lying)
        info = json.loads((store.layer_dir(ref, desc["digest"]) / "info").read_bytes())
        assert info["diff-size"] == raw_size
        assert "its tar-split is unusable: tar-split digest is" in store.log()


# ---- Podman's own zstd:chunked, served lazily --------------------------------------------

@pytest.mark.slow
def test_podman_zstd_chunked_is_served_lazily(tmp_path, registry, store):
    rootfs = images.python_rootfs_tar()
    ref = f"{registry.host}/zstd/python:podman"
    with Podman(tmp_path / "maker", insecure_registries=[registry.host]) as maker:
        maker.import_tar(rootfs, ref)
        maker.push(ref, None, "--compression-format", "zstd:chunked")
    import urllib.request
    req = urllib.request.Request(f"{registry.url}/v2/zstd/python/manifests/podman",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    manifest = json.loads(urllib.request.urlopen(req, timeout=30).read())
    [desc] = manifest["layers"]
    assert desc["mediaType"] == Z.MEDIA_TYPE
    assert Z.OLD_CHECKSUM_ANNOTATION in desc["annotations"]  # Podman 4.3.1 writes the old names
    assert Z.UNCOMPRESSED_SIZE_ANNOTATION not in desc["annotations"]

    mark = registry.mark()
    with Podman(tmp_path / "lazy", additional_layer_store=store.mountpoint,
                insecure_registries=[registry.host]) as podman:
        assert podman.run("run", "--rm", ref, "python3", "-c", "print(1)").stdout.strip() == "1"
    fetched = sum(a.written for a in registry.accesses_since(mark) if desc["digest"] in a.uri)
    assert 0 < fetched < desc["size"] / 2, f"{fetched} of {desc['size']} bytes"
    assert f"layer {desc['digest']}: ready" in store.log()

    # info: zstd, and the exact size of the decompressed blob, computed without reading file contents.
    layer_dir = store.layer_dir(ref, desc["digest"])
    info = json.loads((layer_dir / "info").read_bytes())
    with urllib.request.urlopen(f"{registry.url}/v2/zstd/python/blobs/{desc['digest']}", timeout=60) as resp:
        blob = resp.read()
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert info["compression"] == 4 and info["diff-size"] == len(raw)
    # Every file, zero chunks included, reads back as in the tar Podman was given.
    got, _ = actual_tree(str(layer_dir / "diff"))
    assert got == expected_tree(rootfs.read_bytes())


@pytest.mark.slow
def test_podman_partial_pull_accepts_our_zstd_chunked(tmp_path, registry, client, registries_conf):
    """Podman 4.3.1's own zstd:chunked reader takes what `als convert --zstd-chunked` writes."""
    from als.tools.image import BuiltLayer, push_image
    from als.reference import parse_reference
    from tests.support.alsrun import config_for, run_als
    tar = images.python_rootfs_tar().read_bytes()
    layer = BuiltLayer(blob=io.BytesIO(tar), digest=sha(tar), size=len(tar), diff_id=sha(tar))
    src = f"{registry.host}/zstd/python:tar"
    push_image(client, parse_reference(src), [layer], config_for([layer]))
    # push_image names every layer gzip; say what this one really is.
    manifest = json.loads(client.get_manifest(parse_reference(src)).data)
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    client.put_manifest(parse_reference(src), json.dumps(manifest).encode(), manifest["mediaType"])
    dst = f"{registry.host}/zstd/python:ours"
    res = run_als("convert", "--zstd-chunked", src, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    digest = json.loads(client.get_manifest(parse_reference(dst)).data)["layers"][0]["digest"]
    with Podman(tmp_path / "partial", insecure_registries=[registry.host], partial_pulls=True) as podman:
        res = podman.run("--log-level=debug", "pull", dst)
        assert f"Retrieved partial blob {digest}" in res.stderr, "Podman did not take the partial-pull path"
        assert podman.run("run", "--rm", dst, "python3", "-c", "print(1)").stdout.strip() == "1"


def test_chunks_over_the_limits_are_refused_before_decompressing():
    from als.errors import FormatError
    from als.formats import estargz, toc as T
    from als.formats.zstdchunked import decompress_chunk
    huge = T.Chunk(offset=0, size=estargz.MAX_CHUNK + 1, blob_start=0, blob_end=10, digest="sha256:" + "0" * 64)
    wide = T.Chunk(offset=0, size=10, blob_start=0, blob_end=estargz.MAX_CHUNK_SPAN + 1, digest="sha256:" + "0" * 64)
    for c in (huge, wide):
        with pytest.raises(FormatError, match="bad chunk bounds"):
            decompress_chunk(b"\0" * 16, c)
