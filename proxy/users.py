"""Who a user is and what secret proves it: ``[users]``, then ``auth_file``.

(The third source, ``auth_query``, asks PostgreSQL and lives in ``auth_query.py``.)
A secret is kept as PostgreSQL stores it: plaintext, an md5 hash or a SCRAM secret.
Which login methods a secret allows, and how pgmux then logs in to the server, follows
from its kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .auth import ScramSecret, secret_kind
from .config import Config


@dataclass(frozen=True, slots=True)
class Credential:
    user: str
    secret: str | None  # None: the user is known but has no password (trust only)
    source: str  # "[users]", "auth_file", "auth_query", "[databases]"
    kind: str = field(init=False, compare=False)  # plain, md5, scram or none

    def __post_init__(self) -> None:
        # Worked out once: every login asks, and the answer takes parsing the secret.
        kind = "none" if self.secret is None else secret_kind(self.secret)
        object.__setattr__(self, "kind", kind)


def static_credential(config: Config, user: str) -> Credential | None:
    """The user's credential from ``[users.NAME]``, else from auth_file."""
    entry = config.users.get(user)
    if entry is not None and entry.password is not None:
        return Credential(user, entry.password, "[users]")
    secret = config.auth_file_users.get(user)
    if secret is not None:
        return Credential(user, secret, "auth_file")
    if entry is not None:
        return Credential(user, None, "[users]")
    return None


class SecretCache:
    """Expensive derivations, done once per (user, secret): SCRAM secrets from
    plaintext passwords (PBKDF2), and the ClientKeys recovered from clients' SCRAM
    proofs that let pgmux log in to PostgreSQL with only a SCRAM secret (pass-through).
    """

    def __init__(self) -> None:
        self._scram: dict[tuple[str, str], ScramSecret] = {}
        self.client_keys: dict[tuple[str, str], bytes] = {}
        self.passwords: dict[tuple[str, str], str] = {}

    def scram_secret(self, credential: Credential) -> ScramSecret:
        secret = credential.secret
        assert secret is not None
        key = (credential.user, secret)
        found = self._scram.get(key)
        if found is None:
            if len(self._scram) > 10000:
                self._scram.clear()
            if ScramSecret.is_scram_secret(secret):
                found = ScramSecret.parse(secret)
            else:
                found = ScramSecret.from_password(secret)
            self._scram[key] = found
        return found

    def remember_client_key(self, credential: Credential, client_key: bytes) -> None:
        if credential.secret is not None and credential.kind == "scram":
            if len(self.client_keys) > 10000:
                self.client_keys.clear()
            self.client_keys[(credential.user, credential.secret)] = client_key

    def client_key(self, credential: Credential) -> bytes | None:
        if credential.secret is None:
            return None
        return self.client_keys.get((credential.user, credential.secret))

    def remember_password(self, credential: Credential, password: str) -> None:
        """A cleartext password a client proved against a hashed secret."""
        if credential.secret is not None and credential.kind != "plain":
            if len(self.passwords) > 10000:
                self.passwords.clear()
            self.passwords[(credential.user, credential.secret)] = password

    def password(self, credential: Credential) -> str | None:
        """The plaintext password for server login, if pgmux has or has learned it."""
        if credential.kind == "plain":
            return credential.secret
        if credential.secret is None:
            return None
        return self.passwords.get((credential.user, credential.secret))
