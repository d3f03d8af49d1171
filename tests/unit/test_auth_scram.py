"""SCRAM-SHA-256: stored secrets, pgmux as server, pgmux as client, pass-through."""

import base64
import hashlib
import hmac

import pytest

from proxy.auth import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    TLS_SERVER_END_POINT,
    AuthError,
    AuthProtocolError,
    ScramClientSession,
    ScramSecret,
    ScramServerSession,
)

# RFC 7677 section 3: user "user", password "pencil".
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# pg_authid.rolpassword as PostgreSQL 15 stored it for CREATE ROLE app PASSWORD 'secret'.
PG_SECRET_TEXT = (
    "SCRAM-SHA-256$4096:fwLhcurHrglfweTroa+2pA==$"
    "sfcA1HRmJg/t+4oVMtFqIry3XEtcjgJzDpm9KiJNqvA=:"
    "7PaWEf/3fT1unLRj9SLcd8T99Vrn216yDlPJ7vRBft8="
)

CERT_HASH = hashlib.sha256(b"pretend this is the server certificate").digest()
MOCK_KEY = b"k" * 32

# Iterations kept low where the count does not matter, to keep the suite fast.
FAST = 16


@pytest.fixture(scope="module")
def rfc_secret() -> ScramSecret:
    return ScramSecret.from_password("pencil", RFC_SALT, 4096)


@pytest.fixture(scope="module")
def secret() -> ScramSecret:
    return ScramSecret.from_password("secret", b"0123456789abcdef", FAST)


def _salted(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _exchange(client: ScramClientSession, server: ScramServerSession) -> None:
    """A full SCRAM exchange between the two sessions; raises whatever either raises."""
    server_first = server.handle_client_first(SCRAM_SHA_256, client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def _started(secret: ScramSecret) -> tuple[ScramServerSession, bytes]:
    """A server session that has answered a libpq-style client-first; (session, reply)."""
    server = ScramServerSession(secret)
    reply = server.handle_client_first(SCRAM_SHA_256, b"n,,n=,r=clientnonce")
    return server, reply


def _client_final(
    password: str,
    secret: ScramSecret,
    client_first_bare: bytes,
    server_first: bytes,
    cbind_input: bytes = b"n,,",
    extensions: bytes = b"",
) -> bytes:
    """Hand-built client-final-message (RFC 5802 section 3) for cases our client lacks."""
    nonce = server_first.split(b",")[0][2:]
    without_proof = b"c=" + _b64(cbind_input) + b",r=" + nonce + extensions
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    client_key = _hmac(_salted(password.encode(), secret.salt, secret.iterations), b"Client Key")
    proof = _xor(client_key, _hmac(hashlib.sha256(client_key).digest(), auth_message))
    return without_proof + b",p=" + _b64(proof)


def _assert_raises_exactly(cls: type[Exception], func: object, *args: object) -> Exception:
    assert callable(func)
    with pytest.raises(cls) as excinfo:
        func(*args)
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    return excinfo.value


# -- RFC 7677 test vector ----------------------------------------------------------------


def test_rfc7677_client(rfc_secret: ScramSecret) -> None:
    client = ScramClientSession("pencil", username="user", nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_server(rfc_secret: ScramSecret) -> None:
    server = ScramServerSession(rfc_secret, nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(SCRAM_SHA_256, RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_rfc7677_client_key_recovered(rfc_secret: ScramSecret) -> None:
    server = ScramServerSession(rfc_secret, nonce=RFC_SERVER_NONCE)
    server.handle_client_first(SCRAM_SHA_256, RFC_CLIENT_FIRST)
    server.handle_client_final(RFC_CLIENT_FINAL)
    expected = _hmac(_salted(b"pencil", RFC_SALT, 4096), b"Client Key")
    assert server.client_key == expected
    assert hashlib.sha256(server.client_key).digest() == rfc_secret.stored_key


# -- round trips -------------------------------------------------------------------------


def test_round_trip_random_nonces(secret: ScramSecret) -> None:
    client = ScramClientSession("secret")
    server = ScramServerSession(secret)
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    # 18 raw bytes, base64: 24 printable characters, as PostgreSQL makes them.
    assert len(first) == len(b"n,,n=,r=") + 24
    server_first = server.handle_client_first(SCRAM_SHA_256, first)
    assert server_first.startswith(b"r=" + first[len(b"n,,n=,r=") :])
    assert server_first.endswith(b",s=" + _b64(secret.salt) + b",i=16")
    client_final = client.handle_server_first(server_first)
    assert client_final.startswith(b"c=biws,r=")
    client.verify_server_final(server.handle_client_final(client_final))
    expected = _hmac(_salted(b"secret", secret.salt, FAST), b"Client Key")
    assert server.client_key == expected


def test_random_nonces_differ(secret: ScramSecret) -> None:
    assert ScramClientSession("x").client_first() != ScramClientSession("x").client_first()
    a = ScramServerSession(secret).handle_client_first(SCRAM_SHA_256, b"n,,n=,r=abc")
    b = ScramServerSession(secret).handle_client_first(SCRAM_SHA_256, b"n,,n=,r=abc")
    assert a != b


def test_round_trip_unicode_password_uses_saslprep() -> None:
    # SOFT HYPHEN maps to nothing, so both spellings are the same password.
    secret = ScramSecret.from_password("p\u00e4ssw\u00f6rd", iterations=FAST)
    _exchange(ScramClientSession("p\u00e4ss\u00adw\u00f6rd"), ScramServerSession(secret))


def test_round_trip_with_postgresql_secret() -> None:
    secret = ScramSecret.parse(PG_SECRET_TEXT)
    _exchange(ScramClientSession("secret"), ScramServerSession(secret))


def test_wrong_password_fails(secret: ScramSecret) -> None:
    client = ScramClientSession("wrong")
    server = ScramServerSession(secret)
    client_final = client.handle_server_first(
        server.handle_client_first(SCRAM_SHA_256, client.client_first())
    )
    error = _assert_raises_exactly(AuthError, server.handle_client_final, client_final)
    assert str(error) == "password authentication failed"
    with pytest.raises(RuntimeError):
        _ = server.client_key


def test_tampered_proof_fails(secret: ScramSecret) -> None:
    client = ScramClientSession("secret")
    server = ScramServerSession(secret)
    client_final = client.handle_server_first(
        server.handle_client_first(SCRAM_SHA_256, client.client_first())
    )
    head, proof = client_final.rsplit(b",p=", 1)
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    tampered = head + b",p=" + _b64(bytes(raw))
    _assert_raises_exactly(AuthError, server.handle_client_final, tampered)


def test_tampered_auth_message_fails(secret: ScramSecret) -> None:
    # An extension added after the proof was computed changes AuthMessage.
    client = ScramClientSession("secret")
    server = ScramServerSession(secret)
    client_final = client.handle_server_first(
        server.handle_client_first(SCRAM_SHA_256, client.client_first())
    )
    head, proof = client_final.rsplit(b",p=", 1)
    _assert_raises_exactly(AuthError, server.handle_client_final, head + b",x=1,p=" + proof)


def test_extensions_are_ignored(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    bare = b"n=,r=abc,x=ext"
    server_first = server.handle_client_first(SCRAM_SHA_256, b"n,," + bare)
    final = _client_final("secret", secret, bare, server_first, extensions=b",y=ext")
    assert server.handle_client_final(final).startswith(b"v=")


def test_username_is_ignored_but_escaped(secret: ScramSecret) -> None:
    client = ScramClientSession("secret", username="a,b=c")
    server = ScramServerSession(secret)
    first = client.client_first()
    assert first.startswith(b"n,,n=a=2Cb=3Dc,r=")
    server_first = server.handle_client_first(SCRAM_SHA_256, first)
    client.verify_server_final(server.handle_client_final(client.handle_server_first(server_first)))


# -- server: malformed and hostile messages ----------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"hello",
        b"n,",
        b"n,,",
        b"x,,n=,r=abc",  # unknown channel-binding flag
        b"n,,r=abc",  # username missing
        b"n,,n=",  # nonce missing
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=a b",  # non-printable nonce
        b"n,,n=,s=abc",  # nonce attribute missing
        b"n,,n=,r=abc,,",  # empty attribute
        b"n,,n=,r=abc,1=x",  # bad attribute name
        b"n,,n=,r=abc\x00",  # NUL
        b"n,,n=,r=\xff\xfe",  # not UTF-8
        b"n,x,n=,r=abc",  # garbage where authzid goes
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,a=admin,n=,r=abc",  # authzid, refused like PostgreSQL
    ],
)
def test_client_first_malformed(secret: ScramSecret, message: bytes) -> None:
    server = ScramServerSession(secret)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, message)


def test_authzid_message_says_so(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    error = _assert_raises_exactly(
        AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, b"n,a=admin,n=,r=abc"
    )
    assert "authorization identity" in str(error)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "scram-sha-256", "", SCRAM_SHA_256_PLUS])
def test_invalid_mechanism_without_tls(secret: ScramSecret, mechanism: str) -> None:
    server = ScramServerSession(secret)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_first, mechanism, b"n,,n=,r=abc")


def test_p_flag_without_tls_is_protocol_error(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    _assert_raises_exactly(
        AuthProtocolError,
        server.handle_client_first,
        SCRAM_SHA_256,
        b"p=tls-server-end-point,,n=,r=abc",
    )


def test_y_flag_without_tls_is_fine(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    bare = b"n=,r=abc"
    server_first = server.handle_client_first(SCRAM_SHA_256, b"y,," + bare)
    # c= must repeat the "y,," header ("eSws"), not "n,,".
    final = _client_final("secret", secret, bare, server_first, cbind_input=b"y,,")
    assert server.handle_client_final(final).startswith(b"v=")


def test_y_flag_with_mismatched_c(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    bare = b"n=,r=abc"
    server_first = server.handle_client_first(SCRAM_SHA_256, b"y,," + bare)
    final = _client_final("secret", secret, bare, server_first, cbind_input=b"n,,")
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, final)


@pytest.mark.parametrize(
    "cbind_input",
    [b"y,,", b"p=tls-server-end-point,,", b"n,,extra", b"n,", b""],
)
def test_client_final_c_must_match_header(secret: ScramSecret, cbind_input: bytes) -> None:
    server = ScramServerSession(secret)
    bare = b"n=,r=abc"
    server_first = server.handle_client_first(SCRAM_SHA_256, b"n,," + bare)
    final = _client_final("secret", secret, bare, server_first, cbind_input=cbind_input)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, final)


@pytest.mark.parametrize("how", ["changed", "truncated", "extended", "client part only"])
def test_wrong_nonce_in_client_final(secret: ScramSecret, how: str) -> None:
    server, server_first = _started(secret)
    nonce = server_first.split(b",")[0][2:]
    bad = {
        "changed": nonce[:-1] + (b"A" if nonce[-1:] != b"A" else b"B"),
        "truncated": nonce[:-1],
        "extended": nonce + b"A",
        "client part only": b"clientnonce",
    }[how]
    final = _client_final("secret", secret, b"n=,r=clientnonce", server_first)
    final = final.replace(b",r=" + nonce + b",", b",r=" + bad + b",")
    error = _assert_raises_exactly(AuthProtocolError, server.handle_client_final, final)
    assert "nonce" in str(error)


@pytest.mark.parametrize(
    ("mutate", "part"),
    [
        (lambda f: f.replace(b"c=biws", b"c=bi*s"), "channel binding"),
        (lambda f: f.replace(b"c=biws", b"c=biw"), "channel binding"),
        (lambda f: f.rsplit(b",p=", 1)[0] + b",p=not*base64", "proof"),
        (lambda f: f.rsplit(b",p=", 1)[0] + b",p=" + _b64(b"short"), "proof"),
        (lambda f: f.rsplit(b",p=", 1)[0] + b",p=", "proof"),
        (lambda f: f.rsplit(b",p=", 1)[0], "proof"),  # proof missing
        (lambda f: f.split(b",", 1)[1], "channel binding"),  # c= missing
        (lambda f: b"c=biws," + f.split(b",", 2)[2], "nonce"),  # r= missing
        (lambda f: f.replace(b",p=", b",p=AAAA,p="), "proof"),  # proof not last
        (lambda f: f + b",x=1", "proof"),  # garbage after the proof
        (lambda f: f + b"\x00", "NUL"),
        (lambda f: b"\xff" + f, "UTF-8"),
        (lambda f: b"", "attribute"),
    ],
)
def test_client_final_malformed(secret: ScramSecret, mutate: object, part: str) -> None:
    assert callable(mutate)
    server, server_first = _started(secret)
    final = _client_final("secret", secret, b"n=,r=clientnonce", server_first)
    error = _assert_raises_exactly(AuthProtocolError, server.handle_client_final, mutate(final))
    assert part in str(error)


def test_hand_built_final_is_valid(secret: ScramSecret) -> None:
    # The baseline the malformed cases above start from.
    server, server_first = _started(secret)
    final = _client_final("secret", secret, b"n=,r=clientnonce", server_first)
    assert server.handle_client_final(final).startswith(b"v=")


# -- channel binding ---------------------------------------------------------------------


def _tls_server(secret: ScramSecret) -> ScramServerSession:
    return ScramServerSession(secret, channel_binding=(TLS_SERVER_END_POINT, CERT_HASH))


def test_mechanisms_offered(secret: ScramSecret) -> None:
    assert ScramServerSession(secret).mechanisms == (SCRAM_SHA_256,)
    assert _tls_server(secret).mechanisms == (SCRAM_SHA_256_PLUS, SCRAM_SHA_256)


def test_channel_binding_success(secret: ScramSecret) -> None:
    server = _tls_server(secret)
    header, bare = b"p=tls-server-end-point,,", b"n=,r=abc"
    server_first = server.handle_client_first(SCRAM_SHA_256_PLUS, header + bare)
    final = _client_final("secret", secret, bare, server_first, cbind_input=header + CERT_HASH)
    assert server.handle_client_final(final).startswith(b"v=")
    assert server.client_key == _hmac(_salted(b"secret", secret.salt, FAST), b"Client Key")


@pytest.mark.parametrize(
    "cbind_data",
    [hashlib.sha256(b"the attacker's certificate").digest(), b"", CERT_HASH[:-1]],
)
def test_channel_binding_wrong_certificate(secret: ScramSecret, cbind_data: bytes) -> None:
    server = _tls_server(secret)
    header, bare = b"p=tls-server-end-point,,", b"n=,r=abc"
    server_first = server.handle_client_first(SCRAM_SHA_256_PLUS, header + bare)
    final = _client_final("secret", secret, bare, server_first, cbind_input=header + cbind_data)
    # Not a wrong password but a man in the middle: a protocol violation, as in PostgreSQL.
    error = _assert_raises_exactly(AuthProtocolError, server.handle_client_final, final)
    assert str(error) == "SCRAM channel binding check failed"


def test_channel_binding_downgrade_is_protocol_error(secret: ScramSecret) -> None:
    # We offered -PLUS; a client saying "y" (supports binding, thinks we do not) means
    # someone stripped -PLUS from the list on the way (PostgreSQL: 08P01).
    server = _tls_server(secret)
    error = _assert_raises_exactly(
        AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, b"y,,n=,r=abc"
    )
    assert "channel binding" in str(error)


def test_tls_client_without_binding_is_fine(secret: ScramSecret) -> None:
    # "n": the client does not support channel binding at all; PostgreSQL allows it.
    _exchange(ScramClientSession("secret"), _tls_server(secret))


@pytest.mark.parametrize(
    ("mechanism", "message"),
    [
        (SCRAM_SHA_256_PLUS, b"n,,n=,r=abc"),  # -PLUS but no binding data
        (SCRAM_SHA_256_PLUS, b"y,,n=,r=abc"),
        (SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),  # binding without -PLUS
        (SCRAM_SHA_256_PLUS, b"p=tls-unique,,n=,r=abc"),  # unsupported type
        (SCRAM_SHA_256_PLUS, b"p=,,n=,r=abc"),
        (SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,a=x,n=,r=abc"),
    ],
)
def test_channel_binding_protocol_errors(
    secret: ScramSecret, mechanism: str, message: bytes
) -> None:
    server = _tls_server(secret)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_first, mechanism, message)


@pytest.mark.parametrize("binding", [("tls-unique", CERT_HASH), (TLS_SERVER_END_POINT, b"")])
def test_server_rejects_bad_channel_binding_argument(
    secret: ScramSecret, binding: tuple[str, bytes]
) -> None:
    with pytest.raises(ValueError):
        ScramServerSession(secret, channel_binding=binding)


# -- server: state -----------------------------------------------------------------------


def test_server_final_before_first(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, b"c=biws,r=a,p=b")


def test_server_first_twice(secret: ScramSecret) -> None:
    server, _ = _started(secret)
    _assert_raises_exactly(
        AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, b"n,,n=,r=abc"
    )


def test_server_nothing_after_success(secret: ScramSecret) -> None:
    client, server = ScramClientSession("secret"), ScramServerSession(secret)
    _exchange(client, server)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, b"c=biws")
    _assert_raises_exactly(
        AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, b"n,,n=,r=abc"
    )


def test_server_nothing_after_failure(secret: ScramSecret) -> None:
    server = ScramServerSession(secret)
    with pytest.raises(AuthProtocolError):
        server.handle_client_first(SCRAM_SHA_256, b"garbage")
    _assert_raises_exactly(
        AuthProtocolError, server.handle_client_first, SCRAM_SHA_256, b"n,,n=,r=abc"
    )
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, b"c=biws")


def test_server_no_retry_after_wrong_password(secret: ScramSecret) -> None:
    server, server_first = _started(secret)
    wrong = _client_final("wrong", secret, b"n=,r=clientnonce", server_first)
    right = _client_final("secret", secret, b"n=,r=clientnonce", server_first)
    _assert_raises_exactly(AuthError, server.handle_client_final, wrong)
    _assert_raises_exactly(AuthProtocolError, server.handle_client_final, right)


@pytest.mark.parametrize("nonce", [b"", b"a,b", b"a b", b"caf\xc3\xa9"])
def test_server_rejects_bad_nonce_argument(secret: ScramSecret, nonce: bytes) -> None:
    with pytest.raises(ValueError):
        ScramServerSession(secret, nonce=nonce)


# -- client ------------------------------------------------------------------------------


def _client_at_server_first() -> ScramClientSession:
    client = ScramClientSession("secret", nonce=b"clientnonce")
    client.client_first()
    return client


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"r=clientnonceSERVER,s=c2FsdA==",  # iteration count missing
        b"r=clientnonceSERVER,i=4096",  # salt missing
        b"s=c2FsdA==,i=4096",  # nonce missing
        b"r=clientnonceSERVER,i=4096,s=c2FsdA==",  # wrong order
        b"r=clientnonce,s=c2FsdA==,i=4096",  # no server part
        b"r=otherSERVER,s=c2FsdA==,i=4096",  # does not extend ours
        b"r=clientnonc,s=c2FsdA==,i=4096",
        b"r=clientnonceSER VER,s=c2FsdA==,i=4096",
        b"r=clientnonceSERVER,s=,i=4096",  # empty salt
        b"r=clientnonceSERVER,s=c2Fsd*==,i=4096",  # bad base64
        b"r=clientnonceSERVER,s=c2FsdA=,i=4096",  # bad padding
        b"r=clientnonceSERVER,s=c2FsdA==,i=0",
        b"r=clientnonceSERVER,s=c2FsdA==,i=-1",
        b"r=clientnonceSERVER,s=c2FsdA==,i=abc",
        b"r=clientnonceSERVER,s=c2FsdA==,i=",
        b"r=clientnonceSERVER,s=c2FsdA==,i=4096.0",
        b"r=clientnonceSERVER,s=c2FsdA==,i=99999999999",  # beyond PostgreSQL's int
        b"m=ext,r=clientnonceSERVER,s=c2FsdA==,i=4096",
        b"r=clientnonceSERVER,s=c2FsdA==,i=4096\x00",
    ],
)
def test_client_server_first_malformed(message: bytes) -> None:
    client = _client_at_server_first()
    _assert_raises_exactly(AuthProtocolError, client.handle_server_first, message)


def test_client_server_first_extensions_ignored() -> None:
    client = _client_at_server_first()
    final = client.handle_server_first(b"r=clientnonceSERVER,s=c2FsdA==,i=1,x=ext")
    assert final.startswith(b"c=biws,r=clientnonceSERVER,p=")


def _client_at_server_final(secret: ScramSecret) -> tuple[ScramClientSession, bytes]:
    client, server = ScramClientSession("secret"), ScramServerSession(secret)
    server_first = server.handle_client_first(SCRAM_SHA_256, client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    return client, server_final


def test_client_server_error_reported(secret: ScramSecret) -> None:
    client, _ = _client_at_server_final(secret)
    error = _assert_raises_exactly(AuthError, client.verify_server_final, b"e=invalid-proof")
    assert "invalid-proof" in str(error)


def test_client_wrong_server_signature(secret: ScramSecret) -> None:
    client, server_final = _client_at_server_final(secret)
    raw = bytearray(base64.b64decode(server_final[2:]))
    raw[-1] ^= 0x80
    _assert_raises_exactly(AuthError, client.verify_server_final, b"v=" + _b64(bytes(raw)))


@pytest.mark.parametrize("message", [b"", b"x=abc", b"v=not*base64", b"v=abc", b"\xff"])
def test_client_server_final_malformed(secret: ScramSecret, message: bytes) -> None:
    client, _ = _client_at_server_final(secret)
    _assert_raises_exactly(AuthProtocolError, client.verify_server_final, message)


def test_client_server_final_signature_of_other_exchange(secret: ScramSecret) -> None:
    # A replayed server-final from an earlier exchange must not be accepted.
    _, old_final = _client_at_server_final(secret)
    client, _ = _client_at_server_final(secret)
    _assert_raises_exactly(AuthError, client.verify_server_final, old_final)


def test_client_out_of_order(secret: ScramSecret) -> None:
    client = ScramClientSession("secret")
    _assert_raises_exactly(AuthProtocolError, client.handle_server_first, b"r=a,s=c2FsdA==,i=1")
    client = ScramClientSession("secret")
    _assert_raises_exactly(AuthProtocolError, client.verify_server_final, b"v=AAAA")
    client.client_first()
    _assert_raises_exactly(AuthProtocolError, client.client_first)
    _assert_raises_exactly(AuthProtocolError, client.verify_server_final, b"v=AAAA")
    client, server_final = _client_at_server_final(secret)
    client.verify_server_final(server_final)
    _assert_raises_exactly(AuthProtocolError, client.verify_server_final, server_final)


def test_client_nothing_after_failure(secret: ScramSecret) -> None:
    client, server_final = _client_at_server_final(secret)
    with pytest.raises(AuthError):
        client.verify_server_final(b"e=other-error")
    _assert_raises_exactly(AuthProtocolError, client.verify_server_final, server_final)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"password": "x", "client_key": bytes(32), "server_key": bytes(32)},
        {"client_key": bytes(32)},  # pass-through must verify the server
        {"password": "x", "server_key": bytes(32)},
        {"client_key": bytes(31), "server_key": bytes(32)},
        {"client_key": bytes(32), "server_key": bytes(33)},
        {"password": "x", "nonce": b"a,b"},
        {"password": "x", "nonce": b""},
    ],
)
def test_client_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ScramClientSession(**kwargs)  # type: ignore[arg-type]


def test_salted_password_cache(secret: ScramSecret, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    cache: dict[tuple[bytes, bytes, int], bytes] = {}
    _exchange(ScramClientSession("secret", salted_password_cache=cache), ScramServerSession(secret))
    assert calls == [FAST]
    assert list(cache) == [(b"secret", secret.salt, FAST)]
    assert cache[b"secret", secret.salt, FAST] == real("sha256", b"secret", secret.salt, FAST)
    _exchange(ScramClientSession("secret", salted_password_cache=cache), ScramServerSession(secret))
    assert calls == [FAST]  # second login: no PBKDF2
    _exchange(ScramClientSession("secret"), ScramServerSession(secret))
    assert calls == [FAST, FAST]  # no cache given: computed again


def test_salted_password_cache_is_keyed_by_password(secret: ScramSecret) -> None:
    cache: dict[tuple[bytes, bytes, int], bytes] = {}
    _exchange(ScramClientSession("secret", salted_password_cache=cache), ScramServerSession(secret))
    with pytest.raises(AuthError):
        _exchange(
            ScramClientSession("wrong", salted_password_cache=cache), ScramServerSession(secret)
        )
    assert len(cache) == 2


# -- pass-through ------------------------------------------------------------------------


def _recover_client_key(secret: ScramSecret, password: str) -> bytes:
    """What pgmux learns when a client logs in to it with `password`."""
    frontend = ScramServerSession(secret)
    _exchange(ScramClientSession(password), frontend)
    return frontend.client_key


def test_pass_through_login(secret: ScramSecret) -> None:
    client_key = _recover_client_key(secret, "secret")
    # pgmux logs in to the real server (same stored secret) without the password.
    backend = ScramServerSession(secret)
    upstream = ScramClientSession(client_key=client_key, server_key=secret.server_key)
    _exchange(upstream, backend)
    assert backend.client_key == client_key


def test_pass_through_with_postgresql_secret() -> None:
    secret = ScramSecret.parse(PG_SECRET_TEXT)
    client_key = _recover_client_key(secret, "secret")
    upstream = ScramClientSession(client_key=client_key, server_key=secret.server_key)
    _exchange(upstream, ScramServerSession(secret))


def test_pass_through_wrong_server_key_detected(secret: ScramSecret) -> None:
    client_key = _recover_client_key(secret, "secret")
    upstream = ScramClientSession(client_key=client_key, server_key=bytes(32))
    with pytest.raises(AuthError) as excinfo:
        _exchange(upstream, ScramServerSession(secret))
    assert type(excinfo.value) is AuthError
    assert "server signature" in str(excinfo.value)


def test_pass_through_to_differently_salted_secret_fails(secret: ScramSecret) -> None:
    # ClientKey depends on the salt: it only works against the very same secret.
    client_key = _recover_client_key(secret, "secret")
    other = ScramSecret.from_password("secret", b"another salt....", FAST)
    upstream = ScramClientSession(client_key=client_key, server_key=other.server_key)
    with pytest.raises(AuthError) as excinfo:
        _exchange(upstream, ScramServerSession(other))
    assert str(excinfo.value) == "password authentication failed"


# -- stored secrets ----------------------------------------------------------------------


def test_postgresql_secret_parses_and_round_trips() -> None:
    parsed = ScramSecret.parse(PG_SECRET_TEXT)
    assert parsed.iterations == 4096
    assert parsed.salt == base64.b64decode("fwLhcurHrglfweTroa+2pA==")
    assert parsed.to_string() == PG_SECRET_TEXT
    assert ScramSecret.is_scram_secret(PG_SECRET_TEXT)


def test_from_password_matches_postgresql() -> None:
    parsed = ScramSecret.parse(PG_SECRET_TEXT)
    assert ScramSecret.from_password("secret", parsed.salt, 4096) == parsed
    assert ScramSecret.from_password("Secret", parsed.salt, 4096) != parsed


def test_from_password_keys(secret: ScramSecret) -> None:
    salted = _salted(b"secret", secret.salt, FAST)
    assert secret.stored_key == hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    assert secret.server_key == _hmac(salted, b"Server Key")


def test_from_password_defaults() -> None:
    a = ScramSecret.from_password("pw", iterations=FAST)
    b = ScramSecret.from_password("pw", iterations=FAST)
    assert len(a.salt) == 16
    assert a.salt != b.salt
    assert ScramSecret.from_password.__defaults__ == (None, 4096)


@pytest.mark.parametrize("iterations", [0, -1, 2**31])
def test_from_password_bad_iterations(iterations: int) -> None:
    with pytest.raises(ValueError):
        ScramSecret.from_password("pw", b"salt", iterations)


def test_round_trip_to_string(secret: ScramSecret) -> None:
    assert ScramSecret.parse(secret.to_string()) == secret
    text = secret.to_string()
    assert text.startswith("SCRAM-SHA-256$16:")
    assert ScramSecret.is_scram_secret(text)


def test_repr_hides_keys(secret: ScramSecret) -> None:
    text = repr(secret)
    assert "iterations=16" in text
    assert repr(secret.stored_key) not in text
    assert repr(secret.server_key) not in text


_KEY = "sfcA1HRmJg/t+4oVMtFqIry3XEtcjgJzDpm9KiJNqvA="


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md51df59ed3db2d942a46e855424bbafc45",
        "SCRAM-SHA-1$4096:c2FsdA==$" + _KEY + ":" + _KEY,
        "scram-sha-256$4096:c2FsdA==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$4096$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2FsdA==$" + _KEY,
        "SCRAM-SHA-256$0:c2FsdA==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$-1:c2FsdA==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$abc:c2FsdA==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$:c2FsdA==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2Fsd*==$" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2FsdA==$" + _KEY[:-4] + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2FsdA==$" + _KEY + ":" + _KEY[:-1],
        "SCRAM-SHA-256$4096:c2FsdA==$" + _KEY + ":" + _KEY + ":" + _KEY,
        "SCRAM-SHA-256$4096:c2FsdA==$" + _KEY + ":" + _KEY + "\n",
        " SCRAM-SHA-256$4096:c2FsdA==$" + _KEY + ":" + _KEY,
    ],
)
def test_parse_malformed(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        ScramSecret.parse(text)
    assert _KEY not in str(excinfo.value)
    assert not ScramSecret.is_scram_secret(text)


def test_parse_message_names_the_part() -> None:
    with pytest.raises(ValueError, match="ServerKey"):
        ScramSecret.parse("SCRAM-SHA-256$4096:c2FsdA==$" + _KEY + ":" + _KEY[:-4])
    with pytest.raises(ValueError, match="iteration"):
        ScramSecret.parse("SCRAM-SHA-256$x:c2FsdA==$" + _KEY + ":" + _KEY)


@pytest.mark.parametrize(
    ("iterations", "salt", "stored", "server"),
    [(0, b"s", bytes(32), bytes(32)), (1, b"", bytes(32), bytes(32)), (1, b"s", b"", bytes(32))],
)
def test_secret_validates_fields(
    iterations: int, salt: bytes, stored: bytes, server: bytes
) -> None:
    with pytest.raises(ValueError):
        ScramSecret(iterations, salt, stored, server)


# -- mock authentication -----------------------------------------------------------------


def test_mock_secret_deterministic() -> None:
    a = ScramSecret.mock("nobody", MOCK_KEY)
    assert a == ScramSecret.mock("nobody", MOCK_KEY)
    assert a.salt == _hmac(MOCK_KEY, b"nobody")[:16]
    assert a.iterations == 4096
    assert ScramSecret.mock("somebody", MOCK_KEY).salt != a.salt
    assert ScramSecret.mock("nobody", b"another key").salt != a.salt
    assert ScramSecret.mock("nobody", MOCK_KEY, iterations=FAST).iterations == FAST
    assert ScramSecret.parse(a.to_string()) == a


def test_mock_secret_needs_key() -> None:
    with pytest.raises(ValueError):
        ScramSecret.mock("nobody", b"")


def test_mock_exchange_looks_real_then_fails() -> None:
    mock = ScramSecret.mock("nobody", MOCK_KEY, iterations=FAST)
    server = ScramServerSession(mock, mock=True)
    client = ScramClientSession("guess")
    server_first = server.handle_client_first(SCRAM_SHA_256, client.client_first())
    assert server_first.endswith(b",s=" + _b64(mock.salt) + b",i=16")
    error = _assert_raises_exactly(
        AuthError, server.handle_client_final, client.handle_server_first(server_first)
    )
    assert str(error) == "password authentication failed"


def test_mock_session_fails_even_with_right_password(secret: ScramSecret) -> None:
    server = ScramServerSession(secret, mock=True)
    with pytest.raises(AuthError) as excinfo:
        _exchange(ScramClientSession("secret"), server)
    assert type(excinfo.value) is AuthError
    with pytest.raises(RuntimeError):
        _ = server.client_key


def test_mock_session_same_server_first_as_for_a_user() -> None:
    # Same salt for the same name on every attempt, as a real user would have.
    firsts = set()
    for _ in range(2):
        server = ScramServerSession(ScramSecret.mock("nobody", MOCK_KEY), mock=True, nonce=b"n")
        firsts.add(server.handle_client_first(SCRAM_SHA_256, b"n,,n=,r=abc"))
    assert len(firsts) == 1


def test_error_classes() -> None:
    assert issubclass(AuthProtocolError, AuthError)
    assert AuthError.sqlstate == "28P01"
    assert AuthProtocolError.sqlstate == "08P01"
