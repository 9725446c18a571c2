"""Rootless Podman through `als serve` run by the user inside `podman unshare`.

The documented setup, end to end: a real unprivileged user (made for the
test, with subuid/subgid ranges, removed afterwards), its own
~/.config/containers/{storage,containers,registries}.conf, the store started
with `podman unshare als serve ...` so that it lives in Podman's user and
mount namespaces, a lazy `podman pull` and a container that lists a tree of
files owned by several uids. Inside the container every owner must be what
the image says, exactly as for Podman's own layers: the kernel maps the ids
the store reports through the user namespace (0 -> the user, 1.. -> subuids).
"""

from __future__ import annotations

import io

import pytest

from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import images
from tests.support.rootless import CONTAINERS_CONF, UnshareStore, make_user

pytestmark = pytest.mark.slow


@pytest.fixture
def user():
    with make_user("als-rl") as u:
        yield u


def test_rootless_podman_pulls_lazily_with_the_store_in_podman_unshare(user, registry, client):
    layers = [estargz_layer(io.BytesIO(t), chunk_size=256 << 10) for t in images.tree_image_layers()]
    ref = f"{registry.host}/rootless/tree:esgz"
    push_image(client, parse_reference(ref), layers)

    store_dir = user.home / ".local/share/als"
    mountpoint = store_dir / "store"
    user.write(".config/containers/storage.conf",
               '[storage]\ndriver = "overlay"\n\n[storage.options]\n'
               f'additionallayerstores = ["{mountpoint}:ref"]\n')
    user.write(".config/containers/containers.conf", CONTAINERS_CONF)
    # One registries.conf for both: Podman and the store read ~/.config/containers/registries.conf.
    user.write(".config/containers/registries.conf",
               f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    # `podman unshare` itself opens the storage, which refuses a missing store directory:
    # "overlay: can't stat additionallayerstore dir: ... no such file or directory".
    user.write(".local/share/als/store/.keep", "")
    (mountpoint / ".keep").unlink()

    # No background fetch, so that the registry's log shows what the pull itself needed.
    config = user.write(".config/als/config.toml", "[fetch]\nbackground = false\n")
    store = UnshareStore(user, store_dir, mountpoint, config).start()
    try:
        # The mount exists in Podman's mount namespace, owned by the user's user namespace.
        info = user.run(["podman", "unshare", "grep", f" {mountpoint} ", "/proc/self/mountinfo"]).stdout
        assert "fuse.als" in info and "allow_other" in info

        mark = registry.mark()
        user.run(["podman", "pull", ref])
        got = sum(a.written for a in registry.accesses_since(mark) for l in layers if a.uri.endswith(l.digest))
        assert got < sum(l.size for l in layers) / 2, store.log()[-5000:]
        log = store.log()
        for l in layers:
            assert f"layer {l.digest}: in use" in log

        listing = user.run(["podman", "run", "--rm", ref, *images.tree_listing_command()]).stdout
        lazy = images.parse_tree_listing(listing)
        assert images.diff_listings(images.expected_tree(), lazy) == []
        owners = {(s.uid, s.gid) for s in lazy.values()}
        assert {(0, 0), (1000, 1000), (0, 1000), (65534, 65534)} <= owners  # mapped, not "nobody"

        user.run(["podman", "rmi", ref])
    finally:
        store.stop()
        user.run(["podman", "system", "reset", "--force"], check=False, timeout=120)
    assert "unmounted" in store.log(), store.log()[-3000:]
