"""The distribution-spec 1.1 referrers API in front of a real docker-registry, for tests.

Debian's docker-registry (distribution 2.8) answers ``GET /v2/<name>/referrers/<digest>``
with a 404, as every registry without the API does. This front (httpfront.Front)
gives it the API: it records each manifest with a ``subject`` that the registry
accepts through it, names the subject in an ``OCI-Subject`` header as a 1.1
registry does, and answers the referrers API from what it recorded (filtered by
``artifactType``, in pages of ``page_size`` linked by ``Link: <...>; rel="next"``).
Switches play registries that implement only part of it (no OCI-Subject, a filter
ignored); ``answer`` replaces every referrers answer with anything, for hostile ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.support.httpfront import Answer, Front, Seen

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_MANIFEST_PUT = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")
_REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")


class ReferrersFront:
    """``with ReferrersFront(registry.host) as api:`` talk to ``api.host`` as to a 1.1 registry."""

    def __init__(self, upstream: str, *, oci_subject: bool = True, apply_filter: bool = True,
                 page_size: int = 0):
        self.oci_subject = oci_subject
        self.apply_filter = apply_filter
        self.page_size = page_size
        self.answer: Answer | None = None  # what every referrers request gets instead, if set
        self._lock = threading.Lock()
        self._referrers: dict[tuple[str, str], list[dict]] = {}  # (repository, subject) -> descriptors
        self.front = Front(upstream, hook=self._hook, extra_headers=self._recorded)

    @property
    def host(self) -> str:
        return self.front.host

    def __enter__(self) -> "ReferrersFront":
        self.front.start()
        return self

    def __exit__(self, *exc) -> None:
        self.front.stop()

    def referrer_requests(self) -> list[Seen]:
        return self.front.seen(lambda s: _REFERRERS.fullmatch(urlsplit(s.path).path) is not None)

    # -- what the registry does on a manifest PUT -------------------------------------------
    def _recorded(self, seen: Seen) -> dict[str, str]:
        m = _MANIFEST_PUT.fullmatch(urlsplit(seen.path).path)
        if seen.method != "PUT" or m is None or seen.status != 201:
            return {}
        try:
            doc = json.loads(seen.body)
            subject = doc["subject"]["digest"]
        except (ValueError, KeyError, TypeError):
            return {}
        entry = {"mediaType": doc.get("mediaType", ""), "size": len(seen.body),
                 "digest": "sha256:" + hashlib.sha256(seen.body).hexdigest(),
                 "artifactType": doc.get("artifactType") or doc.get("config", {}).get("mediaType", "")}
        if doc.get("annotations"):
            entry["annotations"] = doc["annotations"]
        with self._lock:
            listed = self._referrers.setdefault((m["name"], subject), [])
            if all(e["digest"] != entry["digest"] for e in listed):
                listed.append(entry)
        return {"OCI-Subject": subject} if self.oci_subject else {}

    # -- the referrers API -------------------------------------------------------------------
    def _hook(self, seen: Seen) -> Answer | None:
        parts = urlsplit(seen.path)
        m = _REFERRERS.fullmatch(parts.path)
        if m is None or seen.method != "GET":
            return None
        if self.answer is not None:
            return self.answer
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            found = list(self._referrers.get((m["name"], m["digest"]), []))
        headers = {"Content-Type": OCI_INDEX}
        if "artifactType" in query and self.apply_filter:
            found = [e for e in found if e["artifactType"] == query["artifactType"]]
            headers["OCI-Filters-Applied"] = "artifactType"
        if self.page_size:
            page = int(query.get("page", "0"))
            rest = found[(page + 1) * self.page_size:]
            found = found[page * self.page_size:(page + 1) * self.page_size]
            if rest:
                headers["Link"] = f'<{parts.path}?{urlencode({**query, "page": page + 1})}>; rel="next"'
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}).encode()
        return 200, headers, body
