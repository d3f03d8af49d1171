"""auth_query: users that are not in the config are looked up in PostgreSQL itself.

A lookup borrows a server connection from the pool of (auth_dbname, or the client's
database, auth_user), runs ``auth_query`` with the user name as ``$1`` through the
extended protocol (no quoting), and gives the server back. Answers, including "no such
user", are cached for ``auth_query_cache_ttl`` seconds, and concurrent logins of one
user share one query: a connection storm does not become an auth_query storm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

from .config import DatabaseConfig
from .errors import ProxyError
from .pool import ClientState, Pool, Registry
from .server import ErrorFields, Rows, ServerConnection
from .users import Credential, static_credential

log = logging.getLogger("pgmux.auth")

Found = Callable[[Credential | None, ProxyError | None], None]


class AuthQuery:
    """The registry's ``auth_query`` hook: ``lookup(database, user, done)``."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[tuple[str, str], tuple[float, Credential | None]] = {}
        self._waiting: dict[tuple[str, str], list[Found]] = {}

    def __call__(self, database: DatabaseConfig, user: str, done: Found) -> None:
        self.lookup(database, user, done)

    def lookup(self, database: DatabaseConfig, user: str, done: Found) -> None:
        key = (database.name, user)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            done(cached[1], None)
            return
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(done)
            return
        self._waiting[key] = [done]
        config = self.registry.config
        auth_user = config.auth_user
        pool = self.registry.pool_for(database, auth_user, static_credential(config, auth_user))
        error = pool.login_retry_error()
        if error is not None:
            # auth_user's own login is failing: say so now, not after a queue timeout.
            self.finish(key, None, _lookup_failed(user, error.message))
            return
        _Lookup(self, pool, key).start()

    def finish(
        self, key: tuple[str, str], credential: Credential | None, error: ProxyError | None
    ) -> None:
        ttl = self.registry.config.auth_query_cache_ttl
        if error is None and ttl:
            if len(self._cache) > 100000:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + ttl, credential)
        for done in self._waiting.pop(key, []):
            done(credential, error)


class _Lookup:
    """One auth_query in flight; waits in the auth_user's pool like a client would."""

    __slots__ = ("key", "owner", "pool", "state", "wait_started")

    def __init__(self, owner: AuthQuery, pool: Pool, key: tuple[str, str]) -> None:
        self.owner = owner
        self.pool = pool
        self.key = key
        self.state = ClientState.IDLE
        self.wait_started = 0.0

    def start(self) -> None:
        server = self.pool.acquire(self)
        if server is not None:
            self.assign_server(server)

    def assign_server(self, server: object) -> None:
        server = cast(ServerConnection, server)
        config = self.owner.registry.config
        server.fetch_rows(
            config.auth_query,
            [self.key[1]],
            lambda rows, error: self._answered(server, rows, error),
        )

    def fail_wait(self, error: ProxyError) -> None:
        self.state = ClientState.CLOSED
        self.owner.finish(self.key, None, _lookup_failed(self.key[1], error.message))

    wait_expired = fail_wait  # a lookup that waited too long has failed all the same

    def _answered(self, server: ServerConnection, rows: Rows, error: ErrorFields | None) -> None:
        self.state = ClientState.CLOSED
        server.settle(None)
        user = self.key[1]
        if error is not None:
            reason = f"auth_query failed: {error.get('C', '?')} {error.get('M', 'error')}"
            self.owner.finish(self.key, None, _lookup_failed(user, reason))
            return
        credential = None
        if rows:
            row = rows[0]
            if len(row) < 2:
                reason = (
                    "auth_query must return two columns (user name, password secret), "
                    f"got {len(row)}"
                )
                self.owner.finish(self.key, None, _lookup_failed(user, reason))
                return
            secret = row[1].decode("utf-8", "surrogateescape") if row[1] is not None else None
            # A NULL secret: no password, or expired (rolvaliduntil); logins fail.
            credential = Credential(user, secret, "auth_query")
        self.owner.finish(self.key, credential, None)


def _lookup_failed(user: str, reason: str) -> ProxyError:
    """The details go to the log; a client that has not logged in learns only that the
    lookup failed (it must not learn auth_user's troubles or the query's text)."""
    log.warning("user lookup for %r failed: %s", user, reason)
    return ProxyError(
        f'cannot verify user "{user}" now: looking it up in PostgreSQL (auth_query) failed',
        hint="the pgmux log has the details",
        sqlstate="28000",
        reason="auth_query_failed",
    )
