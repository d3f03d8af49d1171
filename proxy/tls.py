"""TLS on both legs: contexts built from the config, and a transport that encrypts.

``TLSTransport`` runs TLS with ``ssl.MemoryBIO`` over an already-open transport. One
mechanism serves every case: the SSLRequest upgrade (client and server side) and
PostgreSQL 17's direct TLS, where the ClientHello has already been read by the time
pgmux knows it is one (``asyncio.start_tls`` cannot take bytes already read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .auth.channel_binding import ChannelBindingError, certificate_hash, pem_to_der_certificates
from .config import Config, ConfigError, TLSConfig

log = logging.getLogger("pgmux.tls")

ALPN_POSTGRESQL = "postgresql"  # PostgreSQL 17's ALPN protocol name

_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_PROTOCOL_SETS = {
    "secure": ("tlsv1.2", "tlsv1.3"),
    "all": tuple(_VERSIONS),
    "legacy": tuple(_VERSIONS),
}
# PgBouncer's cipher keywords; "default"/"secure" keep OpenSSL's secure defaults.
_CIPHER_SETS = {
    "default": None,
    "secure": None,
    "normal": "HIGH:MEDIUM:+3DES:!aNULL",
    "fast": "ECDHE+AESGCM:AES128-GCM-SHA256",
    "compat": "HIGH:MEDIUM:+3DES:!aNULL",
}


def client_facing_context(config: Config) -> ssl.SSLContext | None:
    """The context pgmux serves TLS to its clients with; None when client TLS is off."""
    tls = config.client_tls
    if tls.sslmode == "disable":
        return None
    prefix = "client_tls_"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, config, tls, prefix)
    if tls.ca_file:
        _load_ca(context, config, tls, prefix)
        # Ask for a certificate always (cert auth, hba); insist only in verify modes.
        required = tls.sslmode in ("verify-ca", "verify-full")
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    _tune(context, config, tls, prefix)
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    return context


def server_facing_context(config: Config) -> ssl.SSLContext | None:
    """The context pgmux uses as a TLS client of PostgreSQL; None when it never asks."""
    tls = config.server_tls
    if tls.sslmode == "disable":
        return None
    prefix = "server_tls_"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.sslmode in ("verify-ca", "verify-full"):
        _load_ca(context, config, tls, prefix)
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = tls.sslmode == "verify-full"
    else:
        # prefer/require/allow encrypt but do not authenticate the server (libpq's rule).
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        _load_chain(context, config, tls, prefix)  # pgmux's client certificate
    _tune(context, config, tls, prefix)
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    return context


def _path(config: Config, name: str) -> str:
    return str(Path(config.path).parent / name)


def _load_chain(context: ssl.SSLContext, config: Config, tls: TLSConfig, prefix: str) -> None:
    try:
        context.load_cert_chain(_path(config, tls.cert_file), _path(config, tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config.path}: {prefix}cert_file/{prefix}key_file: cannot load "
            f"{tls.cert_file} with {tls.key_file}: {exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, config: Config, tls: TLSConfig, prefix: str) -> None:
    try:
        context.load_verify_locations(cafile=_path(config, tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config.path}: {prefix}ca_file: cannot load {tls.ca_file}: {exc}"
        ) from None


def _tune(context: ssl.SSLContext, config: Config, tls: TLSConfig, prefix: str) -> None:
    names = _PROTOCOL_SETS.get(tls.protocols.lower())
    if names is None:
        names = tuple(part.strip().lower() for part in tls.protocols.split(",") if part.strip())
    unknown = [name for name in names if name not in _VERSIONS]
    if unknown or not names:
        raise ConfigError(
            f"{config.path}: {prefix}protocols: unknown {', '.join(unknown) or 'empty list'}; "
            "use secure, all, or a list of tlsv1.0 tlsv1.1 tlsv1.2 tlsv1.3"
        )
    versions = sorted(_VERSIONS[name] for name in names)
    context.minimum_version = versions[0]
    context.maximum_version = versions[-1]
    ciphers = _CIPHER_SETS.get(tls.ciphers.lower(), tls.ciphers)
    if ciphers is not None:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigError(
                f"{config.path}: {prefix}ciphers: OpenSSL accepts no cipher in {tls.ciphers!r}"
            ) from None


def channel_binding_hash(config: Config) -> bytes | None:
    """tls-server-end-point data for pgmux's certificate (RFC 5929), or None when the
    certificate's signature algorithm has no hash to use (SCRAM-SHA-256-PLUS is then
    not offered, as PostgreSQL does)."""
    tls = config.client_tls
    if tls.sslmode == "disable" or not tls.cert_file:
        return None
    try:
        pem = Path(_path(config, tls.cert_file)).read_text()
        return certificate_hash(pem_to_der_certificates(pem)[0])
    except (OSError, IndexError, ChannelBindingError) as exc:
        log.warning("SCRAM-SHA-256-PLUS not offered: %s", exc)
        return None


def peer_common_name(transport: asyncio.BaseTransport) -> str | None:
    """The CN of a verified client certificate, or None without one."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class TLSTransport(asyncio.Transport, asyncio.Protocol):
    """TLS over a plain transport: the protocol of the raw transport, and the transport
    of the application protocol. Bytes already read can be fed with ``data_received``.
    """

    def __init__(
        self,
        raw: asyncio.Transport,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        on_handshake: Callable[[BaseException | None], None],
    ) -> None:
        super().__init__()
        self._raw = raw
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._on_handshake: Callable[[BaseException | None], None] | None = on_handshake
        self._closing = False
        self._early: list[bytes] = []  # written before the handshake finished
        raw.set_protocol(self)
        if not server_side:
            self._handshake()  # the client speaks first

    # -- the raw side (bytes from the network) ----------------------------------------

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._on_handshake is not None and not self._handshake():
            return
        chunks = []
        read = self._ssl.read
        peer_closed = False
        while True:
            try:
                chunk = read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                peer_closed = True
                break
            except ssl.SSLError:
                self._raw.abort()
                break
            if not chunk:
                peer_closed = True  # SSLObject.read gives b"" once close_notify arrived
                break
            chunks.append(chunk)
        self._flush()
        if chunks and not self._closing:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if peer_closed:
            # The peer ended TLS: it is gone, whether or not it also closed TCP.
            self.close()

    def _handshake(self) -> bool:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            callback, self._on_handshake = self._on_handshake, None
            self._closing = True
            self._raw.close()
            if callback is not None:
                callback(exc)
            return False
        self._flush()
        callback, self._on_handshake = self._on_handshake, None
        if callback is not None:
            callback(None)
        early, self._early = self._early, []
        for data in early:
            self.write(data)
        return not self._closing

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.write(self._outgoing.read())

    def eof_received(self) -> bool | None:
        return self._app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # -- the application side ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        if self._on_handshake is not None:
            self._early.append(bytes(data))
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._on_handshake is None:
            with contextlib.suppress(ssl.SSLError, OSError):
                self._ssl.unwrap()  # close_notify
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "tls_version":
            return self._ssl.version()
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app
