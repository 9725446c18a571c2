"""TLS as Podman sets it up, against real docker-registry processes serving HTTPS.

Each test makes its own CA (tests/support/tlsfiles.py), so nothing on the
host trusts it: a registry is trusted only through what the test sets up,
the "system" store (OpenSSL's SSL_CERT_FILE) or a certs.d directory.
"""

from __future__ import annotations

import logging

import pytest

from als.errors import RegistryError
from als.reference import parse_reference
from als.registry.sysregistries import RegistriesConf
from tests.support.registry import RegistryProcess, free_port
from tests.support.regtest import fast_client, hermetic_env, insecure, push_image, sha, write_conf  # noqa: F401
from tests.support.tlsfiles import CA


def tls_registry(tmp_path, ca: CA, client_ca: CA | None = None) -> RegistryProcess:
    """docker-registry on HTTPS with a certificate from ``ca``; with ``client_ca``, it
    requires a client certificate issued by that CA (http.tls.clientcas)."""
    ca.write_pair("127.0.0.1", tmp_path / "server.crt", tmp_path / "server.key", server=True)
    tls = {"certificate": str(tmp_path / "server.crt"), "key": str(tmp_path / "server.key")}
    if client_ca is not None:
        tls["clientcas"] = [str(client_ca.write(tmp_path / "client-ca.pem"))]
    port = free_port()
    return RegistryProcess(port=port, extra={"http": {"addr": f"127.0.0.1:{port}", "tls": tls}})


@pytest.fixture
def ca():
    return CA.create("als test registry CA")


@pytest.fixture
def https_registry(tmp_path, ca):
    reg = tls_registry(tmp_path, ca)
    try:
        yield reg.start()
    finally:
        reg.cleanup()


@pytest.fixture
def mtls_registry(tmp_path, ca):
    client_ca = CA.create("als test client CA")
    reg = tls_registry(tmp_path, ca, client_ca)
    try:
        yield reg.start(), client_ca
    finally:
        reg.cleanup()


def test_system_ca_store_is_trusted(https_registry, ca, tmp_path, monkeypatch):
    """Trust comes from the system store (OpenSSL's default paths), not from certifi."""
    reg = https_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    empty = tmp_path / "certs.d"
    empty.mkdir()
    with fast_client(RegistriesConf(), certs_dir=str(empty)) as c, pytest.raises(RegistryError) as exc:
        c.get_manifest(ref)
    assert "certificate not trusted" in str(exc.value)
    assert f"{empty / reg.host}" in str(exc.value)  # the message says where a CA would go
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.write(tmp_path / "system-bundle.pem")))
    with fast_client(RegistriesConf(), certs_dir=str(empty)) as c:
        image = push_image(c, ref)
        assert c.read_range(ref, sha(image.layer), 1, 9) == image.layer[1:9]
        assert c.http.schemes == {}  # never tried plain HTTP: not insecure


def test_certs_d_ca_in_podmans_directories(https_registry, ca, hermetic_env, tmp_path, caplog):
    reg = https_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    # Podman's first directory: ~/.config/containers/certs.d/<host:port>/*.crt
    ca.write(hermetic_env / "home" / ".config" / "containers" / "certs.d" / reg.host / "ca.crt")
    caplog.set_level(logging.INFO, logger="als.registry")
    with fast_client(RegistriesConf()) as c:  # no certs_dir: Podman's list
        image = push_image(c, ref)
        assert c.get_manifest(ref).digest == image.digest
    assert f"registry {reg.host}: using {hermetic_env / 'home'}" in caplog.text
    # the override replaces the list: a directory without this host trusts nothing extra
    other = tmp_path / "other-certs.d"
    (other / "unrelated.example").mkdir(parents=True)
    with fast_client(RegistriesConf(), certs_dir=str(other)) as c, pytest.raises(RegistryError,
                                                                                match="not trusted"):
        c.get_manifest(ref)
    ca.write(other / reg.host / "registry-ca.crt")
    with fast_client(RegistriesConf(), certs_dir=str(other)) as c:
        assert c.read_range(ref, sha(image.layer), 0, 5) == image.layer[:5]


def test_client_certificate_from_certs_d(mtls_registry, ca, tmp_path):
    reg, client_ca = mtls_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    certs = tmp_path / "certs.d"
    ca.write(certs / reg.host / "ca.crt")
    with fast_client(RegistriesConf(), certs_dir=str(certs), retries=3) as c, \
            pytest.raises(RegistryError) as exc:
        c.get_manifest(ref)
    assert "client certificate" in str(exc.value) and str(certs / reg.host) in str(exc.value)
    assert "gave up" not in str(exc.value)  # not retried: it cannot get better by itself

    # a certificate from a CA the registry does not accept is refused too
    CA.create("stranger").write_pair("intruder", certs / reg.host / "client.cert",
                                     certs / reg.host / "client.key", server=False)
    with fast_client(RegistriesConf(), certs_dir=str(certs)) as c, pytest.raises(RegistryError,
                                                                                 match="refused"):
        c.get_manifest(ref)

    client_ca.write_pair("als", certs / reg.host / "client.cert", certs / reg.host / "client.key",
                         server=False)
    with fast_client(RegistriesConf(), certs_dir=str(certs)) as c:
        image = push_image(c, ref)
        assert c.read_range(ref, sha(image.layer), 100, 200) == image.layer[100:200]

    # Podman refuses a certificate without its key, and so do we, naming the file
    (certs / reg.host / "client.key").rename(certs / reg.host / "client.key.off")
    with fast_client(RegistriesConf(), certs_dir=str(certs)) as c, pytest.raises(
            RegistryError, match="client certificate client.cert has no key client.key"):
        c.get_manifest(ref)


def test_insecure_skips_verification_but_still_sends_the_client_certificate(mtls_registry, tmp_path):
    reg, client_ca = mtls_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    certs = tmp_path / "certs.d"
    client_ca.write_pair("als", certs / reg.host / "client.cert", certs / reg.host / "client.key",
                         server=False)  # no CA for the server: only `insecure` lets us in
    with fast_client(RegistriesConf(), certs_dir=str(certs)) as c, pytest.raises(RegistryError,
                                                                                 match="not trusted"):
        c.get_manifest(ref)
    with fast_client(write_conf(tmp_path, insecure(reg.host)), certs_dir=str(certs)) as c:
        image = push_image(c, ref)
        assert c.read_range(ref, sha(image.layer), 0, 3) == image.layer[:3]
        assert c.http.schemes == {reg.host: "https"}  # it spoke TLS; insecure did not mean plain HTTP
