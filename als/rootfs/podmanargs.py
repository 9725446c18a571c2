"""The `podman run` arguments that give a `--rootfs` container its image's config.

A root file system carries no config: `podman run --rootfs DIR:O` knows no
entrypoint, command, environment, working directory or user. These options
put them back, so that the container behaves as `podman run IMAGE` would.
Facts they rest on (Podman 4.3 and 5.x):

- ``--rootfs`` is a flag and DIR the first positional argument: every option
  comes before it, and the image's Cmd after it (Podman never applies one
  for a root file system); a user's own command replaces the Cmd, as for an
  image.
- ``--entrypoint`` takes JSON for more than one word (a plain string is one
  program name, spaces and all).
- Podman sets ``container=podman`` in the environment of image containers
  only.
- Podman creates a missing WorkingDir for an image, but refuses a missing
  ``--workdir`` for a root file system; such a directory is left out, with a
  warning.

Printed one per line (``mapfile -t``), since ``$(...)`` would split values
with spaces; a value with a newline cannot be printed so and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from als.errors import ALSError


@dataclass
class PodmanArgs:
    """The arguments, and what could not be carried over (for the user to read)."""

    args: list[str]
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> str:
        """One argument per line, for ``mapfile -t args < <(als mount --print-args ...)``."""
        bad = [a for a in self.args if "\n" in a or "\0" in a]
        if bad:
            raise ALSError(f"the argument {bad[0]!r} holds a line break: it cannot be printed one per line")
        return "".join(a + "\n" for a in self.args)


def podman_args(config: dict, rootfs: str, *, with_cmd: bool = True,
                is_dir: Callable[[str], bool] = lambda _p: True) -> PodmanArgs:
    """The options for image ``config`` (the config blob's JSON), then ``--rootfs ROOTFS:O``, then its Cmd.

    ``is_dir(path)``: whether the image's WorkingDir exists in the root file
    system; ``with_cmd``: False when the user gives a command of their own.
    """
    if ":" in rootfs:
        raise ALSError(f"{rootfs}: podman run --rootfs cannot take a directory whose name has a ':'")
    c = config.get("config") or {}
    out = PodmanArgs([])
    entrypoint = c.get("Entrypoint") or []
    if entrypoint:
        out.args += ["--entrypoint", json.dumps(entrypoint)]
    env = [e for e in c.get("Env") or [] if "=" in e]
    for e in env:
        out.args += ["--env", e]
    if not any(e.startswith("container=") for e in env):
        out.args += ["--env", "container=podman"]
    if c.get("User"):
        out.args += ["--user", c["User"]]
    workdir = c.get("WorkingDir") or ""
    if workdir and is_dir(workdir):
        out.args += ["--workdir", workdir]
    elif workdir:
        out.warnings.append(f"the image's working directory {workdir} does not exist in its file system, and "
                            "podman run --rootfs refuses a missing --workdir: the container starts in /")
    if c.get("StopSignal"):
        out.args += ["--stop-signal", c["StopSignal"]]
    if c.get("Volumes"):
        out.warnings.append("the image declares volumes (" + ", ".join(sorted(c["Volumes"])) + "); podman run "
                            "--rootfs creates none: add --volume options for them if the program needs them")
    out.args += ["--rootfs", f"{rootfs}:O"]
    if with_cmd:
        out.args += list(c.get("Cmd") or [])
    return out
