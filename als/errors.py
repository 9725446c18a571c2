"""The exceptions als raises, one family per concern.

Callers at the edges (the FUSE adapter, the CLI) turn these into errno values
or exit codes; everything below raises them with a message an operator can act
on.
"""


class ALSError(Exception):
    """Base class of every error als raises on purpose."""


class FormatError(ALSError):
    """A layer blob, footer or TOC is not what its format promises."""


class VerificationError(FormatError):
    """Content does not match the digest that the manifest or TOC vouches for."""


class RegistryError(ALSError):
    """The registry could not be reached, refused, or answered nonsense."""


class TransientError(RegistryError):
    """A registry failure worth retrying: connection trouble, timeouts, 5xx, 429.

    The registry client retries these within its count and deadline and only
    lets a plain RegistryError out. ``retry_after`` carries the server's
    Retry-After hint in seconds, if any.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class AuthError(RegistryError):
    """The registry refused our credentials or we have none it accepts."""


class BlockedError(RegistryError):
    """registries.conf marks the registry as blocked."""


class NotFoundError(RegistryError):
    """The registry says the manifest or blob does not exist."""


class ReferrersError(RegistryError):
    """A registry's list of referrers (its referrers API answer or the fallback tag) is not a
    valid OCI index of descriptors, is too large, or cannot be updated safely."""


class ConfigError(ALSError):
    """A configuration file has a bad key or value."""


class CacheError(ALSError):
    """The chunk cache could not store or load an entry."""


class Interrupted(ALSError):
    """The caller went away (the kernel interrupted the FUSE request) while this waited."""
