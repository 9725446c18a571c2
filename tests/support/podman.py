"""The isolated Podman of the tests, demo and bench lives in the package now.

`als optimize` runs workloads with the same isolated, rootful Podman
(temporary storage.conf naming the store, graphroot in a temp dir), so the code
moved to als/podman.py; this module keeps the old import path working.
"""

from als.podman import (HOST_STATE_PATHS, MAX_RUNROOT_LEN, PODMAN_BIN, Podman, PodmanError,  # noqa: F401
                        _check_mountpoint, _is_zombie, _tail, _toml_list, _toml_str)
