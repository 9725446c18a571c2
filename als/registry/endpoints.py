"""Which host a request goes to, and where it goes when that host fails.

registries.conf may put mirrors before an image's registry. A pull tries
them in that order, as Podman does, and falls over to the next on any
failure; pushes go to the registry itself. Once an endpoint has served an
image, it is asked first for that image for a while, so that thousands of
range reads do not each wait for a dead mirror to fail first.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from ..errors import RegistryError, TransientError, VerificationError
from ..reference import Reference
from .retry import RetryPolicy
from .sysregistries import Endpoint, RegistriesConf

log = logging.getLogger("als.registry")

PREFERENCE_TTL = 300.0  # how long a working mirror stays first in line

T = TypeVar("T")


class Endpoints:
    """registries.conf's endpoints for an image, with the one that last worked first."""

    def __init__(self, conf: RegistriesConf):
        self.conf = conf
        self._lock = threading.Lock()
        # image (registry, repository) -> ((host, repository) that worked, when)
        self._preferred: dict[tuple[str, str], tuple[tuple[str, str], float]] = {}

    def for_push(self, ref: Reference) -> tuple[Endpoint, str]:
        """Pushes go to the primary location only: mirrors are for pulling."""
        return [p for p in self.conf.endpoints(ref) if not p[0].is_mirror][-1]

    def ordered(self, ref: Reference) -> list[tuple[Endpoint, str]]:
        """registries.conf's order, with the endpoint that last worked for this image first."""
        eps = self.conf.endpoints(ref)
        with self._lock:
            pref = self._preferred.get((ref.registry, ref.repository))
        if pref and time.monotonic() - pref[1] < PREFERENCE_TTL:
            eps.sort(key=lambda p: (p[0].host, p[1]) != pref[0])
        return eps

    def first_answer(self, ref: Reference, attempt: Callable[[Endpoint, str], T],
                     retry: RetryPolicy) -> T:
        """``attempt(endpoint, repository)`` against the endpoints in order, with retries.

        A mirror that fails for any reason hands over to the next endpoint;
        definitive answers (404, 401) of the primary are raised at once; only
        endpoints that failed transiently are tried again after a backoff.
        """
        pending = self.ordered(ref)
        primary = next(p[0] for p in pending if not p[0].is_mirror)
        several = len(pending) > 1

        def one_pass() -> T:
            nonlocal pending
            failed: list[tuple[Endpoint, str]] = []
            transient: TransientError | None = None
            for i, (ep, repo) in enumerate(pending):
                try:
                    result = attempt(ep, repo)
                except TransientError as exc:
                    failed.append((ep, repo))
                    if ep is primary or transient is None:
                        transient = exc
                    err: Exception = exc
                except (RegistryError, VerificationError) as exc:
                    if ep is primary:
                        raise
                    err = exc
                else:
                    if several:
                        with self._lock:
                            self._preferred[(ref.registry, ref.repository)] = (
                                (ep.host, repo), time.monotonic())
                    return result
                if ep.is_mirror and i + 1 < len(pending):
                    nxt = pending[i + 1][0]
                    log.info("%s; trying %s %s instead", err,
                             "mirror" if nxt.is_mirror else "registry", nxt.host)
            pending = failed
            assert transient is not None
            raise transient

        return retry.run(one_pass)
