"""Running `als` as a user would, and reading what it pushed back from the registry.

Shared by the tests of `als convert`, `als optimize` and the Podman 5 tier:
they run the command line as a subprocess of this checkout and check the
manifests, configs and blobs it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from als.formats import estargz
from als.oci import OCI_MANIFEST
from als.tools.image import BuiltLayer
from tests.support import images
from tests.support.store_process import REPO


LABELS = {"org.example.team": "als", "org.opencontainers.image.title": "python"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run_als(*args: str, conf: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), CONTAINERS_REGISTRIES_CONF=str(conf))
    env.pop("REGISTRY_AUTH_FILE", None)
    return subprocess.run([sys.executable, "-m", "als", *args], env=env, cwd=REPO, timeout=timeout,
                          capture_output=True, text=True, **kw)


def config_for(layers: list[BuiltLayer], *, arch: str = "amd64") -> bytes:
    return json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "Labels": LABELS},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created_by": f"step {i}", "comment": "kept"} for i in range(len(layers))],
    }).encode()


def get_json(registry, repo: str, reference: str, accept: str = OCI_MANIFEST) -> dict:
    import urllib.request
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{reference}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def get_blob(registry, repo: str, digest: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=60) as r:
        data = r.read()
    assert sha(data) == digest
    return data


def tar_of(files: dict[str, bytes]) -> bytes:
    entries = [images.Entry("data", images.DIR, 0o755)]
    entries += [images.Entry(f"data/{n}", images.FILE, 0o644, data=d) for n, d in files.items()]
    return images.layer_tar(entries)


def read_toc(blob: bytes, desc: dict) -> list:
    toc_digest = desc["annotations"][estargz.TOC_DIGEST_ANNOTATION]
    offset, footer = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:], len(blob))
    return estargz.parse_toc(blob[offset:len(blob) - footer], toc_digest, toc_offset=offset).entries
