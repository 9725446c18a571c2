"""Podman 5 (Debian trixie: 5.4, Debian sid: 5.8) against `als serve`, end to end.

Each suite's own Podman runs from a Debian chroot built once and cached
(tests/support/podman5.py), rootful, with the store running on the host and
its mount bind-mounted in. For each image (eStargz written by stargz-snapshotter's
`ctr-remote` and by `als convert`, zstd:chunked written by that Podman's own
`push` and by `als convert --zstd-chunked`) one pipeline runs on a fresh Podman
with one store per suite: pull and run, a separate `run --pull=never`, `save`,
`push`, `system check`, `rmi`. Each test below asserts one step of it, so that a
step a Podman release is known to fail is one expected failure and the rest
still run. Laziness is judged by the registry's own byte counts, and by the
store's log of the layers Podman took from it.

Per suite too: rootless Podman with the store started by the user in `podman
unshare`, and Podman running `als auth-helper` (registries.conf
additional-layer-store-auth-helper) inside the chroot against a registry that
needs credentials the store does not have.

Expected failures are strict, and expect the known failure only: the day a
fixed Podman (or a fixed `als convert`) makes one pass, the suite fails, and the
mark must go.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from als.formats import estargz, zstdchunked
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.tools.podman import PodmanError
from als.reference import parse_reference
from als.registry.credentials.authfiles import AuthFile
from als.registry.client import RegistryClient
from als.registry.credentials.keychain import Keychain
from als.registry.sysregistries import RegistriesConf
from tests.support import containerd as ctd
from tests.support import images, podman5
from tests.support.registry import RegistryProcess
from tests.support.store_process import REPO, StoreProcess
from tests.support.regtest import auth_file, b64auth
from tests.support.alsrun import get_blob, get_json, run_als
from tests.support.regtest import USERS, htpasswd_registry, store_config
from tests.support.rootless import CONTAINERS_CONF as ROOTLESS_CONTAINERS_CONF

pytestmark = pytest.mark.slow

PRINT1 = ["python3", "-c", "print(1)"]
NO_BACKGROUND = "[fetch]\nbackground = false\n"  # the registry's log then shows what reads fetched
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
TOC_ANNOTATIONS = (estargz.TOC_DIGEST_ANNOTATION, *zstdchunked.CHECKSUM_ANNOTATIONS)

LOST_LAYERS = (
    "Podman >= 5.5 (containers/storage >= 1.58) does not record layers taken from an additional "
    "layer store: PutAdditionalLayer never sets the layer's location, so it is saved to no file "
    "and lost when the pulling command exits ('layer not known')")

# This checkout, where Python in the chroot finds it (any user may enter it there).
CHECKOUT_INSIDE = "/opt/als"
CHECKOUT = podman5.Bind(REPO, CHECKOUT_INSIDE, read_only=True)

# What Podman >= 5.5 says of a layer it lost (run, save, push; system check; rmi).
LOST_LAYER_SIGNS = ("layer not known", "layer in lower level storage driver not accounted for",
                    "not found in layer tree")


class LayersLost(Exception):
    """A step failed the way Podman >= 5.5 fails on layers from an additional layer store."""


# image -> the fixture that pushes it
IMAGES = {
    "estargz-ctr-remote": "ctr_remote_image",
    "estargz-als-convert": "als_convert_estargz",
    "zstd-chunked-podman-push": "podman_push_zstd",
    "zstd-chunked-als-convert": "als_convert_zstd",
}


# --------------------------------------------------------------------------
# Images, shared by both suites (but Podman's own push, made by each suite's Podman)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer_tars():
    """A runnable Python root file system and a small second layer on it."""
    hello = images.layer_tar([images.Entry("etc", images.DIR, 0o755),
                              images.Entry("etc/als-podman5.txt", data=b"second layer\n")])
    return [images.python_rootfs_tar().read_bytes(), hello]


@pytest.fixture(scope="module")
def gzip_source(registry, client, layer_tars):
    ref = f"{registry.host}/p5/source:gzip"
    push_image(client, parse_reference(ref), [gzip_layer(t, level=6) for t in layer_tars])
    return ref


@pytest.fixture(scope="module")
def als_convert_estargz(registry, registries_conf, gzip_source):
    dst = f"{registry.host}/p5/als-convert:estargz"
    res = run_als("convert", "--chunk-size", "1M", gzip_source, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    return dst


@pytest.fixture(scope="module")
def als_convert_zstd(registry, registries_conf, gzip_source):
    dst = f"{registry.host}/p5/als-convert:zstd-chunked"
    res = run_als("convert", "--zstd-chunked", "--chunk-size", "1M", gzip_source, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    return dst


@pytest.fixture(scope="module")
def ctr_remote_image(registry, layer_tars, tmp_path_factory):
    missing = ctd.missing_binaries()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages containerd, stargz-snapshotter)")
    dst = f"{registry.host}/p5/ctr-remote:estargz"
    archive = tmp_path_factory.mktemp("ctr") / "image.tar"
    archive.write_bytes(ctd.build_oci_archive(layer_tars))
    with ctd.ContainerdProcess() as daemon:
        daemon.ctr("images", "import", "--base-name", "example.com/als/p5", "--digests", "--no-unpack",
                   str(archive), timeout=300)
        daemon.ctr_remote("image", "convert", "--estargz", "--oci", "example.com/als/p5:latest",
                          "example.com/als/p5:esgz", timeout=300)
        daemon.ctr("images", "push", "--plain-http", dst, "example.com/als/p5:esgz", timeout=300)
    return dst


@pytest.fixture(scope="module")
def private_image(tmp_path_factory):
    """An eStargz image in a registry that refuses anonymous pulls: (registry, ref, layer, auth file
    with alice's login, registries.conf). The environment holds no credentials for it."""
    tmp = tmp_path_factory.mktemp("private")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("REGISTRY_AUTH_FILE", "CONTAINERS_REGISTRIES_CONF", "DOCKER_CONFIG"):
            mp.delenv(var, raising=False)
        with htpasswd_registry(tmp) as reg:
            ref = f"{reg.host}/private/python:estargz"
            conf = tmp / "registries.conf"
            conf.write_text(f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n')
            creds = auth_file(tmp / "auth.json", {reg.host: {"auth": b64auth("alice", USERS["alice"])}})
            with images.python_rootfs_tar().open("rb") as tar:
                layer = estargz_layer(tar, chunk_size=1 << 20, level=1)
            with RegistryClient(RegistriesConf.load(str(conf)), retries=1,
                                credentials=Keychain(auth_files=[AuthFile(creds)])) as c:
                push_image(c, parse_reference(ref), [layer])
            yield reg, ref, layer, creds, conf


# --------------------------------------------------------------------------
# Reading images back
# --------------------------------------------------------------------------

def manifest_and_config(registry: RegistryProcess, ref: str) -> tuple[dict, dict]:
    r = parse_reference(ref)
    manifest = get_json(registry, r.repository, r.reference, accept=ACCEPT)
    config = json.loads(get_blob(registry, r.repository, manifest["config"]["digest"]))
    return manifest, config


def uncompressed_digest(blob: bytes) -> str:
    """sha256 of a layer blob's tar stream, whatever its compression (gzip, zstd or none)."""
    if blob[:2] == b"\x1f\x8b":
        raw = gzip.decompress(blob)
    elif blob[:4] == b"\x28\xb5\x2f\xfd" or (blob[1:4] == b"\x2a\x4d\x18" and blob[0] & 0xF0 == 0x50):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    else:
        raw = blob
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def layer_problems(config: dict, blobs: list[bytes], diff_ids: list[str]) -> list[str]:
    """What is wrong with an image copy (its config and layer blobs) of an image with ``diff_ids``."""
    problems = []
    if config["rootfs"]["diff_ids"] != diff_ids:
        problems.append(f"config diff_ids {config['rootfs']['diff_ids']} != {diff_ids}")
    got = [uncompressed_digest(b) for b in blobs]
    if got != diff_ids:
        problems.append(f"layers uncompress to {got}, not {diff_ids}")
    return problems


# --------------------------------------------------------------------------
# One pipeline per (suite, image)
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    ok: bool
    detail: str


@dataclasses.dataclass
class Pipeline:
    """What each step of one image's run through one Podman gave."""
    image: str
    ref: str
    release: tuple[int, int]
    layers: list[dict]  # the manifest's layer descriptors
    served_by_store: bool = False  # the store logged every layer in use during the pull
    steps: dict[str, Step] = dataclasses.field(default_factory=dict)

    def step(self, label: str, fn) -> None:
        """Run ``fn`` (-> ok, detail) and record its outcome, failures included."""
        try:
            ok, detail = fn()
        except (PodmanError, AssertionError, KeyError, ValueError, OSError) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.steps[label] = Step(ok, detail)

    def keys(self) -> list[set[str]]:
        """For each layer, the digests Podman may name it by in the store: blob or TOC digest."""
        keys = []
        for desc in self.layers:
            ann = desc.get("annotations") or {}
            keys.append({desc["digest"], *(ann[a] for a in TOC_ANNOTATIONS if a in ann)})
        return keys

    def logged(self, log: str, event: str) -> bool:
        """Whether the store's ``log`` has ``event`` (a regex) for every layer."""
        return all(any(re.search(rf"layer {re.escape(k)}: {event}", log) for k in keys) for keys in self.keys())

    def record_laziness(self, registry: RegistryProcess, mark: int, store_log: str) -> None:
        """The "lazy" step: the store served every layer and the registry sent under half the bytes."""
        fetched = sum(a.written for a in registry.accesses_since(mark)
                      if any(a.uri.endswith(d["digest"]) for d in self.layers))
        total = sum(d["size"] for d in self.layers)
        self.served_by_store = self.logged(store_log, "in use")
        self.steps["lazy"] = Step(self.served_by_store and 0 < fetched < total / 2,
                                  f"{fetched} of {total} layer bytes fetched; store served every layer: "
                                  f"{self.served_by_store}")

    def check(self, name: str) -> None:
        step = self.steps.get(name)
        assert step is not None, f"{name}: the pipeline never got to it"
        assert step.ok, f"{name} of {self.ref} on Podman {self.release}: {step.detail}"


def run_pipeline(name: str, ref: str, chroot: podman5.Chroot, store: StoreProcess,
                 registry: RegistryProcess, workdir: Path) -> Pipeline:
    manifest, config = manifest_and_config(registry, ref)
    diff_ids = config["rootfs"]["diff_ids"]
    p = Pipeline(name, ref, chroot.podman_release, manifest["layers"])

    with podman5.Podman5(chroot, workdir, additional_layer_store=store.mountpoint,
                         insecure_registries=[registry.host]) as podman:
        mark, log_at = registry.mark(), len(store.log())

        def pull_and_run():
            out = podman.run("run", "--rm", ref, *PRINT1, timeout=180).stdout.strip()
            return out == "1", f"printed {out!r}"
        p.step("run", pull_and_run)
        p.record_laziness(registry, mark, store.log()[log_at:])

        def run_again():
            out = podman.run("run", "--rm", "--pull=never", ref, *PRINT1, timeout=120).stdout.strip()
            return out == "1", f"printed {out!r}"
        p.step("run --pull=never", run_again)

        def save():
            archive = workdir / "saved.tar"
            podman.run("save", "--format", "oci-archive", "-o", str(archive), ref, timeout=180)
            saved = ctd.read_oci_archive(archive.read_bytes())  # checks every blob's digest
            problems = layer_problems(saved.config, [b for _, b in saved.layer_blobs()], diff_ids)
            archive.unlink()
            return not problems, "; ".join(problems) or "diff IDs match"
        p.step("save", save)

        def push():
            copy = f"{registry.host}/p5/copy-{chroot.suite}-{name}:1"
            podman.push(ref, copy, timeout=180)
            m, c = manifest_and_config(registry, copy)
            r = parse_reference(copy)
            problems = layer_problems(c, [get_blob(registry, r.repository, d["digest"]) for d in m["layers"]],
                                      diff_ids)
            return not problems, "; ".join(problems) or "copy has every layer"
        p.step("push", push)

        def system_check():
            r = podman.run("system", "check", check=False, timeout=120)
            out = (r.stdout + r.stderr).strip()
            return r.returncode == 0 and not out, f"exit {r.returncode}: {out[-2000:]}"
        p.step("system check", system_check)

        def rmi():
            at = len(store.log())
            r = podman.run("rmi", ref, check=False, timeout=120)
            gone = not podman.image_exists(ref)
            released = p.logged(store.log()[at:], r"released \(0\)") if p.served_by_store else True
            return (r.returncode == 0 and gone and released and "corrupt" not in r.stderr,
                    f"exit {r.returncode}, image gone: {gone}, store released every layer: {released}; "
                    f"{r.stderr[-1500:]}")
        p.step("rmi", rmi)
    return p


def run_rootless(chroot: podman5.Chroot, registry: RegistryProcess, client, workdir: Path) -> Pipeline:
    """The documented rootless setup in the chroot: the user's own configuration, the store started
    by the user in `podman unshare`, a lazy pull and run of the tree image, whose owners must come
    out mapped exactly as for Podman's own layers; then a separate `run --pull=never` lists every
    file of it, which must be exactly what the image holds."""
    layers = [estargz_layer(io.BytesIO(t), chunk_size=256 << 10) for t in images.tree_image_layers()]
    ref = f"{registry.host}/p5/rootless-{chroot.suite}:estargz"
    push_image(client, parse_reference(ref), layers)
    p = Pipeline("rootless-tree-estargz", ref, chroot.podman_release, [l.descriptor() for l in layers])
    log_path = workdir / "als.log"
    with podman5.RootlessUser5(chroot, workdir / "user", binds=[CHECKOUT]) as user:
        root = f"{user.home}/.local/share/als"
        mountpoint = f"{root}/store"
        user.write(".config/containers/storage.conf", '[storage]\ndriver = "overlay"\n\n[storage.options]\n'
                   f'additionallayerstores = ["{mountpoint}:ref"]\n')
        user.write(".config/containers/containers.conf", ROOTLESS_CONTAINERS_CONF)
        user.write(".config/containers/registries.conf",
                   f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
        config = user.write(".config/als/config.toml", NO_BACKGROUND)
        # `podman unshare` opens the storage, which refuses a missing store directory
        user.write(".local/share/als/store/.keep", "")
        (user.host_home / ".local/share/als/store/.keep").unlink()
        with open(log_path, "wb") as log:
            user.popen(["podman", "unshare", "python3", "-m", "als", "serve", "--root", root, "--config", config,
                        "--log-level", "debug", mountpoint], env={"PYTHONPATH": CHECKOUT_INSIDE},
                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while b"and answering" not in log_path.read_bytes():
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.1)

        mark = registry.mark()

        def pull_and_run():  # reads little: the laziness is measured on this one
            script = "cat /tree/small.txt; stat -c %u:%g /tree/dir/inner.txt /tree/setgid_file /tree/big_ids"
            out = user.run(["podman", "run", "--rm", ref, "/bin/sh", "-c", script]).stdout
            # owners are mapped through the user namespace like Podman's own layers: not "nobody"
            return out == "hello, tree\n1000:1000\n0:1000\n65534:65534\n", f"printed {out!r}"
        p.step("run", pull_and_run)
        p.record_laziness(registry, mark, log_path.read_text(errors="replace"))

        def run_again():  # reads every file, lists every attribute
            listing = user.run(["podman", "run", "--rm", "--pull=never", ref, *images.tree_listing_command()],
                               timeout=120).stdout
            problems = images.diff_listings(images.expected_tree(), images.parse_tree_listing(listing))
            return not problems, f"differences from the image: {problems}"
        p.step("run --pull=never", run_again)
    # close() killed the namespace: the user's processes, the store among them, and its mount are gone
    return p


def lost_layers_expected(release: tuple[int, int]) -> bool:
    return release >= (5, 5)


# --------------------------------------------------------------------------
# The checks, once per suite
# --------------------------------------------------------------------------

class Podman5Checks:
    """The tier's checks; a subclass per Debian suite names it in ``SUITE``."""

    SUITE = ""

    @pytest.fixture(scope="class")
    def chroot(self):
        return podman5.ensure_chroot(self.SUITE)

    @pytest.fixture(scope="class")
    def suite_store(self, registries_conf, tmp_path_factory):
        with StoreProcess(tmp_path_factory.mktemp(f"als-{self.SUITE}"), registries_conf=registries_conf,
                          config=NO_BACKGROUND) as s:
            yield s

    @pytest.fixture(scope="class")
    def podman_push_zstd(self, chroot, registry, gzip_source, tmp_path_factory):
        """The source image pulled normally by this suite's Podman and pushed as zstd:chunked."""
        dst = f"{registry.host}/p5/podman-{self.SUITE}:zstd-chunked"
        with podman5.Podman5(chroot, tmp_path_factory.mktemp("pusher"), insecure_registries=[registry.host]) as p:
            p.pull(gzip_source, timeout=180)
            p.push(gzip_source, dst, "--compression-format=zstd:chunked", "--force-compression", timeout=300)
        return dst

    @pytest.fixture(scope="class", params=list(IMAGES))
    def pipeline(self, request, chroot, suite_store, registry, tmp_path_factory) -> Pipeline:
        ref = request.getfixturevalue(IMAGES[request.param])
        return run_pipeline(request.param, ref, chroot, suite_store, registry,
                            tmp_path_factory.mktemp(f"p5-{request.param}"))

    @staticmethod
    def expect(request, pipeline: Pipeline, step: str) -> None:
        """Check ``step``; a known failure is a strict expected failure, but only when the step
        failed the known way (any other failure fails the test)."""
        known: tuple[type[Exception], str, bool] | None = None
        if step not in ("run", "lazy") and pipeline.served_by_store and lost_layers_expected(pipeline.release):
            detail = pipeline.steps[step].detail if step in pipeline.steps else ""
            known = LayersLost, LOST_LAYERS, any(s in detail for s in LOST_LAYER_SIGNS)
        if known is not None:
            error, reason, seen = known
            request.applymarker(pytest.mark.xfail(strict=True, raises=error, reason=reason))
            if seen and not pipeline.steps[step].ok:
                raise error(f"{step} of {pipeline.ref}: {pipeline.steps[step].detail}")
        pipeline.check(step)

    def test_pull_and_run(self, request, pipeline):
        self.expect(request, pipeline, "run")

    def test_pull_is_lazy(self, request, pipeline):
        self.expect(request, pipeline, "lazy")

    def test_run_pull_never_afterwards(self, request, pipeline):
        self.expect(request, pipeline, "run --pull=never")

    def test_save_has_the_config_diff_ids(self, request, pipeline):
        self.expect(request, pipeline, "save")

    def test_push_copies_every_layer(self, request, pipeline):
        self.expect(request, pipeline, "push")

    def test_system_check_is_clean(self, request, pipeline):
        self.expect(request, pipeline, "system check")

    def test_rmi_releases_the_layers(self, request, pipeline):
        self.expect(request, pipeline, "rmi")

    @pytest.fixture(scope="class")
    def rootless(self, chroot, registry, client, tmp_path_factory) -> Pipeline:
        blocked = podman5.userns_blocked()
        if blocked:
            pytest.skip(f"rootless Podman needs user namespaces: {blocked}")
        return run_rootless(chroot, registry, client, tmp_path_factory.mktemp(f"rootless-{self.SUITE}"))

    def test_rootless_pull_and_run_lazily(self, request, rootless):
        self.expect(request, rootless, "run")
        self.expect(request, rootless, "lazy")

    def test_rootless_run_pull_never_afterwards(self, request, rootless):
        self.expect(request, rootless, "run --pull=never")

    def test_auth_helper_hands_podmans_credentials_to_the_store(self, chroot, private_image, tmp_path):
        """Podman runs `als auth-helper` (registries.conf additional-layer-store-auth-helper) inside
        the chroot; the store itself has no credentials for the registry, which refuses anonymous
        pulls, so it can serve the image only with what the helper passed."""
        reg, ref, layer, creds, conf = private_image
        hermetic = {name: tmp_path / name.lower() for name in ("HOME", "XDG_CONFIG_HOME", "DOCKER_CONFIG",
                                                               "XDG_RUNTIME_DIR")}
        for d in hermetic.values():
            d.mkdir()
        store_dir = tmp_path / "als"
        store_dir.mkdir()
        with StoreProcess(store_dir, registries_conf=conf, config=store_config(),
                          env={k: str(v) for k, v in hermetic.items()}) as store:
            helper = "/usr/local/bin/als-auth-helper"
            # what `pip install als` puts on PATH, here with this checkout seen at /opt/als
            script = ("#!/usr/bin/python3\nimport sys\n"
                      f"sys.path.insert(0, {CHECKOUT_INSIDE!r})\n"
                      "from als.ops.authhelper import main\nsys.exit(main())\n")
            # the store's root at its default place, where the helper looks for the control socket
            with podman5.Podman5(chroot, tmp_path / "podman", additional_layer_store=store.mountpoint,
                                 insecure_registries=[reg.host], auth_file=creds, auth_helper=helper,
                                 files={helper: script},
                                 binds=[CHECKOUT, podman5.Bind(store.root, "/var/lib/als")]) as podman:
                mark = reg.mark()
                out = podman.run("run", "--rm", ref, *PRINT1, timeout=180).stdout.strip()
                assert out == "1"
                log = store.log()
                assert f"als auth-helper passed credentials for {reg.host}/private/python" in log, log[-3000:]
                fetched = sum(a.written for a in reg.accesses_since(mark) if a.uri.endswith(layer.digest))
                assert 0 < fetched < layer.size / 2, f"{fetched} of {layer.size} bytes fetched"
                assert USERS["alice"] not in log


class TestPodman54Trixie(Podman5Checks):
    SUITE = "trixie"


class TestPodman58Sid(Podman5Checks):
    SUITE = "sid"
