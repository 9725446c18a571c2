"""The registry client the way als.toml configures it.

`als serve`, `als convert` and `als optimize` must reach registries with the
same registries.conf, credentials, certificates and timeouts, so that an
image converted by hand behaves like one the store pulls; they all build
their client here.
"""

from __future__ import annotations

from ..config import Config, RegistryConfig
from .client import RegistryClient
from .credentials.keychain import Keychain
from .sysregistries import RegistriesConf


def registry_client(config: Config) -> RegistryClient:
    """The registry client of ``config``: `als serve`, `als convert` and `als optimize` share it."""
    registries = RegistriesConf.load(config.registry.registries_conf or None)
    return RegistryClient(registries, credentials=keychain(config.registry, registries),
                          connect_timeout=config.registry.connect_timeout,
                          read_timeout=config.registry.read_timeout, retries=config.registry.retries,
                          retry_deadline=config.registry.request_deadline,
                          certs_dir=config.registry.certs_dir or None)


def keychain(reg: RegistryConfig, registries: RegistriesConf) -> Keychain:
    """Credential sources in the documented order (credentials/keychain.py)."""
    return Keychain(helpers=registries.credential_helpers,
                    global_auth_file=reg.global_auth_file or None,
                    kubelet_config=reg.kubelet_config or None,
                    helper_timeout=reg.credential_helper_timeout)
