"""Why a request failed, in words fit for a log line, and which failures retrying cannot fix.

``requests`` wraps urllib3, which wraps ssl and socket errors, and its
messages carry whole URLs, which for uploads and redirected blobs hold
session state or signatures. The exchange classifies a failure from the
underlying cause and describes it without the URL.
"""

from __future__ import annotations

import ssl
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import requests


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> ssl/socket), a bounded walk."""
    todo, seen = [exc], 0
    while todo and seen < 20:
        e = todo.pop(0)
        seen += 1
        yield e
        nxt = [getattr(e, "reason", None), e.__cause__, e.__context__]
        nxt += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo += [x for x in nxt if isinstance(x, BaseException)]


_CLIENT_CERT_ALERTS = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
                       "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
                       "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_ACCESS_DENIED")


def tls_wants_client_cert(exc: BaseException) -> bool:
    """The server refused the handshake over our (missing) client certificate."""
    return any(isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in _CLIENT_CERT_ALERTS
               for e in causes(exc))


def tls_is_definitive(exc: BaseException) -> bool:
    """A TLS failure that trying again will not fix: bad certificate, not TLS at all."""
    if tls_wants_client_cert(exc):
        return True
    for e in causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return True
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in (
                "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
            return True
    return False


def why(exc: BaseException) -> str:
    """A short cause for a requests exception, without URLs (which may carry upload state)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    for e in causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {e.verify_message}"
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
            return f"TLS error {e.reason}"
        if isinstance(e, OSError) and not isinstance(e, ssl.SSLError) and e.strerror:
            return e.strerror
    return type(exc).__name__


def redact_url(url: str) -> str:
    """The URL without its query (upload URLs carry opaque session state)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
