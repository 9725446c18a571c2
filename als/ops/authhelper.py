"""`als auth-helper`: Podman >= 5.1's ``additional-layer-store-auth-helper``.

After loading a manifest, containers/image (>= 5.31) runs the program named
by registries.conf ``additional-layer-store-auth-helper`` with no arguments
and the credentials it used on stdin, as
``{"<image reference>": {"username", "password", "identityToken"}}``. It
only logs a warning when the helper fails, so a pull never fails because of
us. We pass the credentials to the running store over its control socket
(``<root>/als.sock``, root only), which keeps them in memory for that
repository (als/registry/credentials/keychain.py): private images then work with no
auth file at all.

Podman gives the helper no arguments, so the store's root comes from
``$ALS_ROOT`` (default /var/lib/als); ``als-auth-helper`` is the console
script to name in registries.conf.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from als.reference import parse_reference
from als.registry.credentials.entries import Credentials

log = logging.getLogger("als")

DEFAULT_ROOT = "/var/lib/als"
ROOT_ENV = "ALS_ROOT"
OP = "credentials"  # the control socket operation
MAX_INPUT = 1 << 20
_FIELDS = ("username", "password", "identityToken")


class HelperInputError(ValueError):
    """The helper's input is not what containers/image sends; the message holds no secret."""


def parse_input(doc: Any) -> dict[str, Credentials]:
    """``{ref: {"username", "password", "identityToken"}}`` -> {ref: Credentials}.

    Entries without any credential (an anonymous pull) are left out. Raises
    HelperInputError naming the first bad reference or field, never a value.
    """
    if not isinstance(doc, dict):
        raise HelperInputError("expected a JSON object of image references")
    out: dict[str, Credentials] = {}
    for ref, entry in doc.items():
        if not isinstance(ref, str):
            raise HelperInputError("an image reference is not a string")
        try:
            parse_reference(ref)
        except ValueError as exc:
            raise HelperInputError(str(exc)) from None
        if not isinstance(entry, dict):
            raise HelperInputError(f"the entry for {ref} is not a JSON object")
        for key, value in entry.items():
            if key not in _FIELDS:
                raise HelperInputError(f"the entry for {ref} has an unknown field {key!r}")
            if not isinstance(value, str):
                raise HelperInputError(f"the entry for {ref}: {key} is not a string")
        creds = Credentials(username=entry.get("username", ""), password=entry.get("password", ""),
                            identity_token=entry.get("identityToken", ""))
        if creds.username or creds.identity_token:
            out[ref] = creds
    return out


def handle(keychain, req: dict) -> dict:
    """The daemon's side (control op ``credentials``): keep them in ``keychain``'s memory.

    Answers with repository names and a count, never a secret.
    """
    if keychain is None:
        raise HelperInputError("this store's registry client has no keychain")
    creds = parse_input(req.get("credentials"))
    names = [keychain.pushed.add(ref, c) for ref, c in creds.items()]
    if names:
        log.info("als auth-helper passed credentials for %s", ", ".join(sorted(set(names))))
    return {"accepted": len(names), "repositories": sorted(set(names))}


def root_default() -> str:
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


def add_parser(sub) -> None:
    """``als auth-helper`` in the main command line."""
    p = sub.add_parser(
        "auth-helper", help="pass registry credentials from Podman to the running store",
        description="Podman >= 5.1 additional-layer-store-auth-helper: reads "
                    '{"<image>": {"username", "password", "identityToken"}} on stdin and hands '
                    "the credentials to the store running with the same --root, over its "
                    "root-only control socket. The store keeps them in memory only. Podman runs "
                    "the helper without arguments: name the als-auth-helper program in "
                    "registries.conf and set $ALS_ROOT if the root is not /var/lib/als.")
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None,
                   help=f"the store's --root (default: ${ROOT_ENV}, else {DEFAULT_ROOT})")


def run(args) -> int:
    """Read stdin, check it, send it; 0 on success, 1 (and a message on stderr) otherwise."""
    from als.ops.control import ControlError, request

    root = Path(args.root or root_default())
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        print(f"als auth-helper: input larger than {MAX_INPUT} bytes", file=sys.stderr)
        return 1
    try:
        doc = json.loads(data)
        creds = parse_input(doc)
    except ValueError as exc:  # JSON errors quote no input; HelperInputError names no secret
        msg = str(exc) if isinstance(exc, HelperInputError) else "stdin is not valid JSON"
        print(f"als auth-helper: {msg}", file=sys.stderr)
        return 1
    if not creds:
        return 0  # an anonymous pull: nothing to pass
    try:
        answer = request(root, OP, credentials=doc)
    except ControlError as exc:
        print(f"als auth-helper: {exc}", file=sys.stderr)
        return 1
    print(f"als auth-helper: the store at {root} took credentials for "
          f"{', '.join(answer.get('repositories', []))}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``als-auth-helper`` console script (what registries.conf names)."""
    p = argparse.ArgumentParser(prog="als-auth-helper",
                                description="Podman's additional-layer-store-auth-helper for als.")
    _arguments(p)
    return run(p.parse_args(argv))
