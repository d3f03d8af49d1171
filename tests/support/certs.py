"""Throwaway X.509 certificates for the TLS tests, made with ``cryptography``.

``make_certs(directory)`` writes, all keys EC P-256, all signatures ECDSA with SHA-256:

- ``ca.crt`` / ``ca.key``: the test CA; everything below except the "badca" client
  certificate is signed by it.
- ``other-ca.crt`` / ``other-ca.key``: an unrelated CA, for "signed by the wrong CA" cases.
- ``server.crt`` / ``server.key``: CN=localhost, SAN DNS:localhost and IP:127.0.0.1.
- ``wrong-host.crt`` / ``wrong-host.key``: CN and only SAN DNS:db.example.invalid, for
  verify-full host-name mismatches.
- ``client-app``, ``client-md5user``, ``client-nobody`` (``.crt`` / ``.key``): client
  certificates (CN=app, CN=md5user, CN=nobody) signed by the CA.
- ``client-app-badca.crt`` / ``.key``: CN=app, signed by the other CA.
- ``client-app-expired.crt`` / ``.key``: CN=app, signed by the CA, valid only in 2000.

Using them: ``client_ssl_context`` (asyncpg, raw sockets), ``libpq_ssl_params`` (psycopg,
psql), and ``pgmux_client_tls`` / ``pgmux_server_tls`` (pgmux config overrides).

Certificates are PEM, mode 0644; private keys are unencrypted PEM PKCS#8, mode 0600 and
owned by whoever runs the tests. The directory is made mode 0755 if it does not exist.
PostgreSQL never reads them here: ``PgCluster.create(tls=...)`` copies what the server
needs into its data directory, owned by the user the server runs as.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_HOSTNAME = "localhost"
SERVER_IP = "127.0.0.1"
WRONG_HOSTNAME = "db.example.invalid"


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertFiles:
    """Paths of everything ``make_certs`` wrote (see the module docstring)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    server_cert: Path
    server_key: Path
    wrong_host_cert: Path
    wrong_host_key: Path
    client_app_cert: Path
    client_app_key: Path
    client_md5user_cert: Path
    client_md5user_key: Path
    client_nobody_cert: Path
    client_nobody_key: Path
    client_app_badca_cert: Path
    client_app_badca_key: Path
    client_app_expired_cert: Path
    client_app_expired_key: Path

    @property
    def server(self) -> CertPair:
        return CertPair(self.server_cert, self.server_key)

    @property
    def wrong_host(self) -> CertPair:
        return CertPair(self.wrong_host_cert, self.wrong_host_key)

    @property
    def client_app(self) -> CertPair:
        return CertPair(self.client_app_cert, self.client_app_key)

    @property
    def client_md5user(self) -> CertPair:
        return CertPair(self.client_md5user_cert, self.client_md5user_key)

    @property
    def client_nobody(self) -> CertPair:
        return CertPair(self.client_nobody_cert, self.client_nobody_key)

    @property
    def client_app_badca(self) -> CertPair:
        return CertPair(self.client_app_badca_cert, self.client_app_badca_key)

    @property
    def client_app_expired(self) -> CertPair:
        return CertPair(self.client_app_expired_cert, self.client_app_expired_key)

    def serving(self, pair: CertPair) -> CertFiles:
        """The same files, with ``pair`` as the server certificate: for
        ``PgCluster.create(tls=certs.serving(certs.wrong_host))``."""
        return dataclasses.replace(self, server_cert=pair.cert, server_key=pair.key)


Certs = CertFiles


# -- making them -------------------------------------------------------------------------

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: _Key


def _new_key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgmux tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])  # fmt: skip


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    flags.update(allowed)
    return x509.KeyUsage(**flags)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _make_ca(cn: str) -> _Issuer:
    key = _new_key()
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _make_leaf(
    issuer: _Issuer,
    cn: str,
    *,
    server: bool,
    sans: list[x509.GeneralName] | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, _Key]:
    key = _new_key()
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _write_key(path: Path, key: _Key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask


def make_certs(directory: Path) -> CertFiles:
    """Write the whole set into ``directory`` (made if missing); return their paths."""
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(parents=True)
        os.chmod(directory, 0o755)
    files = CertFiles(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        other_ca_cert=directory / "other-ca.crt",
        other_ca_key=directory / "other-ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        wrong_host_cert=directory / "wrong-host.crt",
        wrong_host_key=directory / "wrong-host.key",
        client_app_cert=directory / "client-app.crt",
        client_app_key=directory / "client-app.key",
        client_md5user_cert=directory / "client-md5user.crt",
        client_md5user_key=directory / "client-md5user.key",
        client_nobody_cert=directory / "client-nobody.crt",
        client_nobody_key=directory / "client-nobody.key",
        client_app_badca_cert=directory / "client-app-badca.crt",
        client_app_badca_key=directory / "client-app-badca.key",
        client_app_expired_cert=directory / "client-app-expired.crt",
        client_app_expired_key=directory / "client-app-expired.key",
    )

    ca = _make_ca("pgmux test CA")
    other_ca = _make_ca("pgmux other test CA")
    _write_cert(files.ca_cert, ca.cert)
    _write_key(files.ca_key, ca.key)
    _write_cert(files.other_ca_cert, other_ca.cert)
    _write_key(files.other_ca_key, other_ca.key)

    def save(pair: CertPair, made: tuple[x509.Certificate, _Key]) -> None:
        _write_cert(pair.cert, made[0])
        _write_key(pair.key, made[1])

    server_sans: list[x509.GeneralName] = [
        x509.DNSName(SERVER_HOSTNAME),
        x509.IPAddress(ipaddress.ip_address(SERVER_IP)),
    ]
    save(files.server, _make_leaf(ca, SERVER_HOSTNAME, server=True, sans=server_sans))
    save(
        files.wrong_host,
        _make_leaf(ca, WRONG_HOSTNAME, server=True, sans=[x509.DNSName(WRONG_HOSTNAME)]),
    )
    save(files.client_app, _make_leaf(ca, "app", server=False))
    save(files.client_md5user, _make_leaf(ca, "md5user", server=False))
    save(files.client_nobody, _make_leaf(ca, "nobody", server=False))
    save(files.client_app_badca, _make_leaf(other_ca, "app", server=False))
    expired = _make_leaf(
        ca, "app", server=False,
        not_before=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC),
    )  # fmt: skip
    save(files.client_app_expired, expired)
    return files


# -- using them --------------------------------------------------------------------------


def client_ssl_context(
    cafile: Path | None,
    client: CertPair | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for asyncpg's ``ssl=`` (or any client).

    With ``cafile`` the server certificate is verified against it (and its host name too
    unless ``check_hostname=False``: verify-full vs verify-ca); without it nothing is
    verified (sslmode=require). ``client`` is a certificate to present.
    """
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.check_hostname = check_hostname
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def libpq_ssl_params(
    sslmode: str,
    cafile: Path | None = None,
    client: CertPair | None = None,
) -> dict[str, str]:
    """libpq connection parameters (psycopg / psql) for ``sslmode`` and these files."""
    params = {"sslmode": sslmode}
    if cafile is not None:
        params["sslrootcert"] = str(cafile)
    if client is not None:
        params["sslcert"] = str(client.cert)
        params["sslkey"] = str(client.key)
    return params


def pgmux_client_tls(
    certs: CertFiles,
    sslmode: str = "prefer",
    *,
    server: CertPair | None = None,
    ca: Path | None = None,
    **extra: object,
) -> dict[str, object]:
    """pgmux config overrides for TLS towards clients: ``client_tls_sslmode``, pgmux's
    certificate (``server``, default ``certs.server``), ``client_tls_ca_file`` when ``ca``
    is given; ``extra`` are more keys as they are (``client_tls_protocols="tlsv1.3"``)."""
    pair = server or certs.server
    config: dict[str, object] = {
        "client_tls_sslmode": sslmode,
        "client_tls_key_file": str(pair.key),
        "client_tls_cert_file": str(pair.cert),
    }
    if ca is not None:
        config["client_tls_ca_file"] = str(ca)
    config.update(extra)
    return config


def pgmux_server_tls(
    sslmode: str,
    *,
    ca: Path | None = None,
    client: CertPair | None = None,
    **extra: object,
) -> dict[str, object]:
    """pgmux config overrides for TLS towards PostgreSQL: ``server_tls_sslmode``,
    ``server_tls_ca_file`` and pgmux's own client certificate, when given."""
    config: dict[str, object] = {"server_tls_sslmode": sslmode}
    if ca is not None:
        config["server_tls_ca_file"] = str(ca)
    if client is not None:
        config["server_tls_cert_file"] = str(client.cert)
        config["server_tls_key_file"] = str(client.key)
    config.update(extra)
    return config
