"""SCRAM-SHA-256 the way PostgreSQL speaks it (RFC 5802, RFC 7677).

Three pieces: `ScramSecret`, the verifier pg_authid stores; `ScramServerSession`, pgmux
checking a client's password; `ScramClientSession`, pgmux logging in to the real server,
either with a password or, for pass-through, with the ClientKey recovered from a
client's proof.

PostgreSQL's deviations from the RFCs (auth-scram.c, and the PostgreSQL docs,
"SASL Authentication"): the username in the SCRAM messages is ignored (the startup
packet's user counts, so libpq sends "n="), authzid is refused, nonces are 18 random
bytes in base64, and the only channel binding type is tls-server-end-point.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from .errors import AuthError, AuthProtocolError
from .saslprep import saslprep, scram_password_bytes

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
# RFC 5929 section 4; the only channel binding type PostgreSQL implements.
TLS_SERVER_END_POINT = "tls-server-end-point"

# PostgreSQL's defaults (src/include/common/scram-common.h): 4096 iterations
# (RFC 7677 section 4's minimum), 16-byte salts, 18 raw bytes per nonce half.
DEFAULT_ITERATIONS = 4096
_SALT_LEN = 16
NONCE_BYTES = 18
# SHA-256 output: the length of StoredKey, ServerKey, ClientKey, proofs and signatures.
_KEY_LEN = 32
# PostgreSQL keeps the iteration count in a C int; hashlib needs it to fit a C long too.
_MAX_ITERATIONS = 2**31 - 1

_SECRET_SCHEME = "SCRAM-SHA-256"
_FAILED = "password authentication failed"


# -- primitives (RFC 5802 section 2.2) -------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")  # one-shot, in C: several times hmac.new's speed


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _hi(password: bytes, salt: bytes, iterations: int) -> bytes:
    # Hi() is PBKDF2 with HMAC-SHA-256 and one output block (RFC 5802 section 2.2).
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _keys_from_salted(salted_password: bytes) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a SaltedPassword (RFC 5802 section 3)."""
    return _hmac(salted_password, b"Client Key"), _hmac(salted_password, b"Server Key")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64: raises ValueError on anything outside the alphabet or bad padding."""
    # validate=True refuses characters outside the alphabet instead of skipping them;
    # binascii.Error and the non-ASCII str error are both ValueError subclasses.
    return base64.b64decode(text, validate=True)


# RFC 5802 section 7: printable = %x21-2B / %x2D-7E (printable ASCII except ",").
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


def _is_printable(text: str) -> bool:
    return _PRINTABLE.fullmatch(text) is not None


def _new_nonce() -> str:
    return _b64encode(secrets.token_bytes(NONCE_BYTES))


def _nonce_arg(nonce: bytes | None) -> str:
    """Validate a caller-supplied nonce: printable ASCII bytes, used as is."""
    if nonce is None:
        return _new_nonce()
    text = nonce.decode("ascii", "replace")
    if not _is_printable(text):
        raise ValueError("nonce must be non-empty printable ASCII without ','")
    return text


def _decode_message(data: bytes, what: str) -> str:
    # The messages are UTF-8 (RFC 5802 section 7); PostgreSQL also refuses embedded NULs.
    if b"\x00" in data:
        raise AuthProtocolError(f"malformed SCRAM {what}: contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthProtocolError(f"malformed SCRAM {what}: not valid UTF-8") from None


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split `a=value,b=value` into pairs; RFC 5802 section 7: attr-val = ALPHA "=" value."""
    pairs: list[tuple[str, str]] = []
    for part in text.split(","):
        name = part[:1]
        if not (name.isascii() and name.isalpha() and part[1:2] == "="):
            raise AuthProtocolError(f"malformed SCRAM {what}: expected attribute=value")
        pairs.append((name, part[2:]))
    return pairs


def _expect(pairs: list[tuple[str, str]], index: int, name: str, label: str, what: str) -> str:
    if index >= len(pairs) or pairs[index][0] != name:
        raise AuthProtocolError(f"malformed SCRAM {what}: missing {label} ({name}=)")
    return pairs[index][1]


def _decode_b64_attr(value: str, label: str, what: str) -> bytes:
    try:
        return _b64decode(value)
    except ValueError:
        raise AuthProtocolError(f"malformed SCRAM {what}: {label} is not valid base64") from None


def _parse_iterations(value: str) -> int | None:
    """A positive decimal iteration count that fits PostgreSQL's int, else None."""
    if not (value.isascii() and value.isdigit()):
        return None
    count = int(value)
    return count if 1 <= count <= _MAX_ITERATIONS else None


# -- stored secrets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """A SCRAM-SHA-256 verifier: what pg_authid.rolpassword holds for a SCRAM role.

    The keys stay out of repr(): StoredKey plus a sniffed exchange reveals the
    ClientKey, and ServerKey lets its holder impersonate the server.
    """

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError("SCRAM iteration count must be between 1 and 2^31-1")
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        if len(self.stored_key) != _KEY_LEN or len(self.server_key) != _KEY_LEN:
            raise ValueError(f"SCRAM StoredKey and ServerKey must be {_KEY_LEN} bytes")

    @classmethod
    def from_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramSecret:
        """The secret PostgreSQL would store for `password` (random 16-byte salt if None)."""
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise ValueError("SCRAM iteration count must be between 1 and 2^31-1")
        if salt is None:
            salt = secrets.token_bytes(_SALT_LEN)
        salted = _hi(scram_password_bytes(password), salt, iterations)
        client_key, server_key = _keys_from_salted(salted)
        # RFC 5802 section 3: StoredKey := H(ClientKey).
        return cls(iterations, salt, _h(client_key), server_key)

    @classmethod
    def parse(cls, text: str) -> ScramSecret:
        """Parse `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).

        That is the format PostgreSQL stores (parse_scram_secret() in auth-scram.c).
        Error messages name the broken part but never repeat the input.
        """
        scheme, sep, rest = text.partition("$")
        if scheme != _SECRET_SCHEME or not sep:
            raise ValueError("not a SCRAM-SHA-256 secret: expected 'SCRAM-SHA-256$' prefix")
        params, sep, keys = rest.partition("$")
        if not sep:
            raise ValueError("malformed SCRAM secret: expected '$' before the keys")
        iterations_text, sep, salt_text = params.partition(":")
        if not sep:
            raise ValueError("malformed SCRAM secret: expected '<iterations>:<salt>'")
        stored_text, sep, server_text = keys.partition(":")
        if not sep:
            raise ValueError("malformed SCRAM secret: expected '<StoredKey>:<ServerKey>'")
        iterations = _parse_iterations(iterations_text)
        if iterations is None:
            raise ValueError("malformed SCRAM secret: iteration count is not a positive integer")
        fields: list[bytes] = []
        for label, value in (
            ("salt", salt_text),
            ("StoredKey", stored_text),
            ("ServerKey", server_text),
        ):
            try:
                fields.append(_b64decode(value))
            except ValueError:
                raise ValueError(f"malformed SCRAM secret: {label} is not valid base64") from None
        salt, stored_key, server_key = fields
        if not salt:
            raise ValueError("malformed SCRAM secret: salt is empty")
        if len(stored_key) != _KEY_LEN:
            raise ValueError(f"malformed SCRAM secret: StoredKey is not {_KEY_LEN} bytes")
        if len(server_key) != _KEY_LEN:
            raise ValueError(f"malformed SCRAM secret: ServerKey is not {_KEY_LEN} bytes")
        return cls(iterations, salt, stored_key, server_key)

    @staticmethod
    def is_scram_secret(text: str) -> bool:
        """True if `text` parses as a stored SCRAM-SHA-256 secret."""
        try:
            ScramSecret.parse(text)
        except ValueError:
            return False
        return True

    def to_string(self) -> str:
        """PostgreSQL's stored form; `ScramSecret.parse(s.to_string()) == s`."""
        return (
            f"{_SECRET_SCHEME}${self.iterations}:{_b64encode(self.salt)}"
            f"${_b64encode(self.stored_key)}:{_b64encode(self.server_key)}"
        )

    @classmethod
    def mock(cls, user: str, key: bytes, *, iterations: int = DEFAULT_ITERATIONS) -> ScramSecret:
        """A stable fake secret for a user that does not exist.

        PostgreSQL's mock authentication (auth-scram.c, mock_scram_secret()): an unknown
        user gets a full exchange with a salt that is the same on every attempt and
        then fails like a wrong password, so clients cannot probe for role names.
        `key` is a server-wide secret so the fake salt cannot be predicted;
        `iterations` should match the real secrets so the reply looks the same.
        """
        if not key:
            raise ValueError("mock SCRAM key must not be empty")
        name = user.encode("utf-8", "surrogateescape")
        salt = _hmac(key, name)[:_SALT_LEN]
        # Never checked (the session runs with mock=True), but deterministic and derived
        # from the key rather than zeros. Role names cannot contain NUL, so these HMAC
        # inputs never collide with the salt's.
        stored_key = _hmac(key, b"\x00StoredKey\x00" + name)
        server_key = _hmac(key, b"\x00ServerKey\x00" + name)
        return cls(iterations, salt, stored_key, server_key)


# -- pgmux as the SCRAM server (authenticating clients) ------------------------------------


class _ServerState(enum.Enum):
    AWAIT_CLIENT_FIRST = enum.auto()
    AWAIT_CLIENT_FINAL = enum.auto()
    SUCCEEDED = enum.auto()
    FAILED = enum.auto()


class ScramServerSession:
    """One SCRAM-SHA-256 exchange in which pgmux checks a client's password.

    The caller sends AuthenticationSASL with `mechanisms`, passes the client's
    SASLInitialResponse to `handle_client_first` and its SASLResponse to
    `handle_client_final`, and relays the returned bytes in AuthenticationSASLContinue
    and AuthenticationSASLFinal. Any exception ends the exchange: later calls raise
    AuthProtocolError.
    """

    def __init__(
        self,
        secret: ScramSecret,
        *,
        nonce: bytes | None = None,
        channel_binding: tuple[str, bytes] | None = None,
        mock: bool = False,
    ) -> None:
        """`nonce` is the server's half of the nonce, printable ASCII used as is (random
        when None). `channel_binding` is ("tls-server-end-point", certificate hash) when
        the client connection is TLS, which also offers SCRAM-SHA-256-PLUS. `mock=True`
        makes the exchange run normally and fail at the end (unknown user).
        """
        if channel_binding is not None:
            cb_type, cb_data = channel_binding
            if cb_type != TLS_SERVER_END_POINT:
                raise ValueError(f"unsupported channel binding type, use {TLS_SERVER_END_POINT}")
            if not cb_data:
                raise ValueError("channel binding data (certificate hash) must not be empty")
        self._secret = secret
        self._server_nonce = _nonce_arg(nonce)
        self._channel_binding = channel_binding
        self._mock = mock
        self._state = _ServerState.AWAIT_CLIENT_FIRST
        self._cbind_flag = ""
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._client_key: bytes | None = None

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """SASL mechanisms to offer, most preferred first, as PostgreSQL lists them."""
        if self._channel_binding is not None:
            return (SCRAM_SHA_256_PLUS, SCRAM_SHA_256)
        return (SCRAM_SHA_256,)

    @property
    def client_key(self) -> bytes:
        """The ClientKey recovered from the client's proof; only after success.

        With it pgmux can log in to the real server as this client (pass-through)
        without knowing the password.
        """
        if self._client_key is None:
            raise RuntimeError("client_key is only known after a successful SCRAM exchange")
        return self._client_key

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        """Take SASLInitialResponse (mechanism and client-first-message); return
        server-first-message."""
        if self._state is not _ServerState.AWAIT_CLIENT_FIRST:
            raise AuthProtocolError("unexpected SCRAM client-first-message at this point")
        # Until this returns, the session counts as failed: any exception ends it.
        self._state = _ServerState.FAILED
        reply = self._client_first(mechanism, data)
        self._state = _ServerState.AWAIT_CLIENT_FINAL
        return reply

    def handle_client_final(self, data: bytes) -> bytes:
        """Take the client-final-message; return server-final-message on success.

        A wrong password raises AuthError; a malformed message AuthProtocolError.
        """
        if self._state is not _ServerState.AWAIT_CLIENT_FINAL:
            raise AuthProtocolError("unexpected SCRAM client-final-message at this point")
        self._state = _ServerState.FAILED
        reply = self._client_final(data)
        self._state = _ServerState.SUCCEEDED
        return reply

    def _client_first(self, mechanism: str, data: bytes) -> bytes:
        what = "client-first-message"
        plus = mechanism == SCRAM_SHA_256_PLUS
        if not (mechanism == SCRAM_SHA_256 or (plus and self._channel_binding is not None)):
            raise AuthProtocolError("client selected an invalid SASL authentication mechanism")
        text = _decode_message(data, what)

        # RFC 5802 section 7: gs2-header = gs2-cbind-flag "," [ authzid ] ","
        flag, sep, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep and sep2):
            raise AuthProtocolError(f"malformed SCRAM {what}: incomplete GS2 header")
        if flag in ("n", "y"):
            if plus:
                # PostgreSQL: -PLUS without "p=" means the binding was stripped.
                raise AuthProtocolError(
                    "client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not "
                    "include channel binding data"
                )
            if flag == "y" and self._channel_binding is not None:
                # RFC 5802 section 6: "y" means the client supports channel binding but
                # believes the server does not. We offered -PLUS, so someone removed it
                # from the mechanism list: a downgrade attack. The exchange must fail.
                # Not a wrong password: PostgreSQL reports it as a protocol violation.
                raise AuthProtocolError(
                    "SCRAM channel binding negotiation error: the client supports channel "
                    "binding but thinks the server does not, although it does"
                )
        elif flag.startswith("p="):
            if not plus:
                raise AuthProtocolError(
                    "client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                    "message includes channel binding data"
                )
            if self._channel_binding is None or flag[2:] != self._channel_binding[0]:
                raise AuthProtocolError("unsupported SCRAM channel-binding type")
        else:
            raise AuthProtocolError(f"malformed SCRAM {what}: unexpected channel-binding flag")
        if authzid.startswith("a="):
            # PostgreSQL refuses an authorization identity: the role comes from the
            # startup packet.
            raise AuthProtocolError("client uses authorization identity, but it is not supported")
        if authzid:
            raise AuthProtocolError(f"malformed SCRAM {what}: unexpected attribute in GS2 header")

        pairs = _attributes(bare, what)
        if pairs[0][0] == "m":
            # RFC 5802 section 5.1: "m=" announces a mandatory extension; none exist.
            raise AuthProtocolError("client requires a mandatory SCRAM extension (m=)")
        # The username is ignored, as PostgreSQL does: the startup packet's user counts.
        _expect(pairs, 0, "n", "username", what)
        client_nonce = _expect(pairs, 1, "r", "nonce", what)
        if not _is_printable(client_nonce):
            raise AuthProtocolError(f"malformed SCRAM {what}: nonce is empty or not printable")
        # Further optional extensions are allowed and ignored (RFC 5802 section 7).

        self._cbind_flag = flag
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        salt = _b64encode(self._secret.salt)
        self._server_first = f"r={self._nonce},s={salt},i={self._secret.iterations}"
        return self._server_first.encode("ascii")

    def _client_final(self, data: bytes) -> bytes:
        what = "client-final-message"
        text = _decode_message(data, what)
        pairs = _attributes(text, what)
        # client-final-message = channel-binding "," nonce ["," extensions] "," proof
        cbind_value = _expect(pairs, 0, "c", "channel binding", what)
        nonce = _expect(pairs, 1, "r", "nonce", what)
        if len(pairs) < 3 or pairs[-1][0] != "p":
            raise AuthProtocolError(f"malformed SCRAM {what}: missing proof (p=) at the end")
        if any(name == "p" for name, _ in pairs[2:-1]):
            raise AuthProtocolError(f"malformed SCRAM {what}: proof (p=) must come last")

        # RFC 5802 section 7: c= is base64(gs2-header [cbind-data]); the header must be
        # the one sent in client-first-message, and cbind-data is present only for "p".
        cbind_input = _decode_b64_attr(cbind_value, "channel binding (c=)", what)
        header = self._gs2_header.encode("ascii")
        if not hmac.compare_digest(cbind_input[: len(header)], header):
            raise AuthProtocolError(
                f"malformed SCRAM {what}: channel binding (c=) does not match the GS2 header"
            )
        cbind_data = cbind_input[len(header) :]
        if self._cbind_flag.startswith("p="):
            assert self._channel_binding is not None  # checked in client-first
            if not hmac.compare_digest(cbind_data, self._channel_binding[1]):
                # The client hashed another certificate than ours: a man in the middle.
                raise AuthProtocolError("SCRAM channel binding check failed")
        elif cbind_data:
            raise AuthProtocolError(
                f"malformed SCRAM {what}: unexpected channel binding data without 'p='"
            )

        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise AuthProtocolError(f"malformed SCRAM {what}: nonce does not match")
        proof = _decode_b64_attr(pairs[-1][1], "proof (p=)", what)
        if len(proof) != _KEY_LEN:
            raise AuthProtocolError(f"malformed SCRAM {what}: proof (p=) has the wrong length")

        # RFC 5802 section 3: AuthMessage, ClientSignature := HMAC(StoredKey, AuthMessage),
        # ClientKey := ClientProof XOR ClientSignature, and H(ClientKey) must be StoredKey.
        without_proof = text.rsplit(",", 1)[0]
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}"
        auth_bytes = auth_message.encode("utf-8")
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth_bytes))
        valid = hmac.compare_digest(_h(client_key), self._secret.stored_key)
        # Mock sessions did all the same work above and now fail like a wrong password.
        if not valid or self._mock:
            raise AuthError(_FAILED)
        self._client_key = client_key
        server_signature = _hmac(self._secret.server_key, auth_bytes)
        return b"v=" + base64.b64encode(server_signature)


# -- pgmux as the SCRAM client (logging in to PostgreSQL) -------------------------------


class _ClientState(enum.Enum):
    START = enum.auto()
    AWAIT_SERVER_FIRST = enum.auto()
    AWAIT_SERVER_FINAL = enum.auto()
    SUCCEEDED = enum.auto()
    FAILED = enum.auto()


def _sanitize(text: str, limit: int = 200) -> str:
    # The server's e= text goes into our log and error messages: keep it printable.
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned[:limit]


def _saslname(username: str) -> str:
    # RFC 5802 section 5.1: the username is SASLprep'd (used as is if that fails, as
    # for passwords), then "=" and "," are escaped as "=3D" and "=2C".
    try:
        prepared = saslprep(username)
    except ValueError:
        prepared = username
    return prepared.replace("=", "=3D").replace(",", "=2C")


class ScramClientSession:
    """One SCRAM-SHA-256 login of pgmux to a PostgreSQL server (mechanism SCRAM_SHA_256).

    Give either the password, or for pass-through the `client_key` recovered by a
    ScramServerSession together with the `server_key` of the same stored secret. The
    server's signature is always verified, which is why pass-through needs ServerKey.
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: bytes | None = None,
        salted_password_cache: dict[tuple[bytes, bytes, int], bytes] | None = None,
        username: str = "",
        expected_salt: tuple[bytes, int] | None = None,
    ) -> None:
        """`nonce` is the client nonce, printable ASCII used as is (random when None).

        `username` goes into "n=". PostgreSQL ignores it and libpq sends it empty, the
        default; other values exist for RFC test vectors and non-PostgreSQL peers.

        `salted_password_cache` maps (password bytes, salt, iterations) to the
        SaltedPassword, so repeated logins skip PBKDF2. The caller owns and bounds it.

        `expected_salt` is (salt, iterations) of the secret the pass-through keys came
        from: a server offering another salt holds another secret, and the login could
        only fail with a misleading "password authentication failed"; AuthError says why.
        """
        if (password is None) == (client_key is None):
            raise ValueError("give exactly one of password or client_key")
        if client_key is not None:
            if server_key is None:
                raise ValueError(
                    "client_key needs server_key: the server's signature must be verified"
                )
            if len(client_key) != _KEY_LEN or len(server_key) != _KEY_LEN:
                raise ValueError(f"client_key and server_key must be {_KEY_LEN} bytes")
        elif server_key is not None:
            raise ValueError("server_key is only used together with client_key")
        self._password = None if password is None else scram_password_bytes(password)
        self._client_key = client_key
        self._server_key = server_key
        self._cache = salted_password_cache
        self._expected_salt = expected_salt
        self._client_nonce = _nonce_arg(nonce)
        self._client_first_bare = f"n={_saslname(username)},r={self._client_nonce}"
        self._expected_signature = b""
        self._state = _ClientState.START

    def client_first(self) -> bytes:
        """The client-first-message for SASLInitialResponse."""
        if self._state is not _ClientState.START:
            raise AuthProtocolError("SCRAM client-first-message was already sent")
        self._state = _ClientState.AWAIT_SERVER_FIRST
        # "n,,": no channel binding, no authzid. The username is empty by default, as
        # libpq sends it: PostgreSQL takes the role from the startup packet.
        return f"n,,{self._client_first_bare}".encode()

    def handle_server_first(self, data: bytes) -> bytes:
        """Take server-first-message (AuthenticationSASLContinue); return client-final."""
        if self._state is not _ClientState.AWAIT_SERVER_FIRST:
            raise AuthProtocolError("unexpected SCRAM server-first-message at this point")
        self._state = _ClientState.FAILED
        reply = self._server_first(data)
        self._state = _ClientState.AWAIT_SERVER_FINAL
        return reply

    def verify_server_final(self, data: bytes) -> None:
        """Check server-final-message (AuthenticationSASLFinal): the server's signature
        proves it knows the secret. Raises AuthError if it does not or reports e=."""
        if self._state is not _ClientState.AWAIT_SERVER_FINAL:
            raise AuthProtocolError("unexpected SCRAM server-final-message at this point")
        self._state = _ClientState.FAILED
        what = "server-final-message"
        pairs = _attributes(_decode_message(data, what), what)
        name, value = pairs[0]
        if name == "e":
            # RFC 5802 section 7: server-error = "e=" server-error-value.
            raise AuthError(f"server rejected SCRAM authentication: {_sanitize(value)}")
        if name != "v":
            raise AuthProtocolError(f"malformed SCRAM {what}: missing verifier (v=)")
        signature = _decode_b64_attr(value, "verifier (v=)", what)
        if not hmac.compare_digest(signature, self._expected_signature):
            raise AuthError("SCRAM server signature is wrong: the server does not know the secret")
        self._state = _ClientState.SUCCEEDED

    def _salted_password(self, password: bytes, salt: bytes, iterations: int) -> bytes:
        if self._cache is None:
            return _hi(password, salt, iterations)
        key = (password, salt, iterations)
        salted = self._cache.get(key)
        if salted is None:
            salted = _hi(password, salt, iterations)
            self._cache[key] = salted
        return salted

    def _server_first(self, data: bytes) -> bytes:
        what = "server-first-message"
        text = _decode_message(data, what)
        pairs = _attributes(text, what)
        if pairs[0][0] == "m":
            raise AuthProtocolError("server requires a mandatory SCRAM extension (m=)")
        nonce = _expect(pairs, 0, "r", "nonce", what)
        salt_text = _expect(pairs, 1, "s", "salt", what)
        iterations_text = _expect(pairs, 2, "i", "iteration count", what)
        # RFC 5802 section 5.1: the server appends its own nonce to ours.
        if not (
            _is_printable(nonce)
            and len(nonce) > len(self._client_nonce)
            and hmac.compare_digest(
                nonce[: len(self._client_nonce)].encode("utf-8"),
                self._client_nonce.encode("ascii"),
            )
        ):
            raise AuthProtocolError(f"malformed SCRAM {what}: nonce does not extend ours")
        salt = _decode_b64_attr(salt_text, "salt (s=)", what)
        if not salt:
            raise AuthProtocolError(f"malformed SCRAM {what}: salt (s=) is empty")
        iterations = _parse_iterations(iterations_text)
        if iterations is None:
            raise AuthProtocolError(f"malformed SCRAM {what}: invalid iteration count (i=)")

        if self._password is not None:
            salted = self._salted_password(self._password, salt, iterations)
            client_key, server_key = _keys_from_salted(salted)
        else:
            # Pass-through: ClientKey and ServerKey are all SCRAM needs; salt and
            # iteration count only serve to derive them from a password.
            assert self._client_key is not None and self._server_key is not None
            expected = self._expected_salt
            if expected is not None and (
                not hmac.compare_digest(salt, expected[0]) or iterations != expected[1]
            ):
                raise AuthError(
                    "SCRAM pass-through impossible: the server's SCRAM secret for this role "
                    "differs from the one pgmux holds (other salt or iteration count)"
                )
            client_key, server_key = self._client_key, self._server_key

        # "c=biws" is base64("n,,"), our GS2 header (RFC 5802 section 7).
        without_proof = f"c=biws,r={nonce}"
        auth_bytes = f"{self._client_first_bare},{text},{without_proof}".encode()
        client_signature = _hmac(_h(client_key), auth_bytes)
        proof = _xor(client_key, client_signature)
        self._expected_signature = _hmac(server_key, auth_bytes)
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")
