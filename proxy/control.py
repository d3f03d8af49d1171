"""The admin console's control commands, carried out in this process.

PAUSE, RESUME, DISABLE, ENABLE, RECONNECT, KILL, KILL_CLIENT, WAIT_CLOSE, SET,
RELOAD and SHUTDOWN, with PgBouncer's semantics and error texts (pgmux's errors add a
hint). With workers each worker runs the command on its own part of the instance
(peers.py sends it to all of them); this module knows only its own process. The
moves themselves are the pool's and the registry's (pool.py); the App lends what only
it can do (reload the file, apply a config, shut down) through ``Lifecycle``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from .config import ConfigError, set_value
from .errors import AdminError, ProxyError
from .pool import Pool, Registry
from .snapshot import ADMIN_DB

log = logging.getLogger("pgmux.admin")

POLL = 0.05  # seconds between checks while PAUSE or WAIT_CLOSE waits

SHUTDOWN_MODES = ("", "wait_for_servers", "wait_for_clients")


class Lifecycle(Protocol):
    """What the App lends the console."""

    def reload(self) -> list[str]:
        """Re-read the config file and run with it; what changed. Raises ConfigError."""
        ...

    def apply_config(self, config: Any) -> list[str]:
        """Run with ``config`` from now on (after SET); what changed."""
        ...

    def shutdown_requested(self, mode: str) -> None:
        """Stop pgmux: "" now, or "wait_for_servers" / "wait_for_clients"."""
        ...


class Cancelled(Exception):
    """The admin cancelled a command that was waiting (Ctrl-C in psql)."""


class LocalControl:
    """Control commands against this process's registry."""

    def __init__(self, registry: Registry, lifecycle: Lifecycle) -> None:
        self.registry = registry
        self.lifecycle = lifecycle

    async def run(self, command: str, arg: str | None, cancelled: asyncio.Event) -> str:
        """Carry out ``command`` (lowercase) with its argument; the CommandComplete tag.
        Raises AdminError with PgBouncer's message (and a hint) when refused."""
        handler: Callable[..., Any] | None = getattr(self, f"_{command}", None)
        if handler is None:
            raise AdminError(f"unknown control command {command!r}")
        result = handler(arg, cancelled)
        if asyncio.iscoroutine(result):
            result = await result
        return str(result)

    # -- helpers ------------------------------------------------------------------------

    def _database(self, name: str | None, action: str, *, required: bool = False) -> str | None:
        """The database a command names: checked against the config (None: all)."""
        if name is None:
            if required:
                raise AdminError(
                    "a database is required", hint=f"{action.upper()} takes a database name"
                )
            return None
        if name == ADMIN_DB or name == "pgmux":
            raise AdminError(f"cannot {action} admin db: {name}")
        if name not in self.registry.config.databases:
            raise AdminError(
                f"no such database: {name}",
                hint="SHOW DATABASES lists them: "
                + ", ".join(sorted(self.registry.config.databases)),
            )
        return name

    def _pools(self, database: str | None) -> list[Pool]:
        return [
            pool
            for pool in self.registry.iter_pools()
            if database is None or pool.settings.database.name == database
        ]

    async def _wait(self, done: Callable[[], bool], cancelled: asyncio.Event) -> None:
        while not done():
            if cancelled.is_set():
                raise Cancelled()
            await asyncio.sleep(POLL)

    # -- the commands ---------------------------------------------------------------------

    async def _pause(self, arg: str | None, cancelled: asyncio.Event) -> str:
        registry = self.registry
        database = self._database(arg, "pause")
        if registry.paused:
            raise AdminError("already suspended/paused", hint="RESUME first")
        if database is None:
            registry.paused = True
        else:
            registry.paused_databases.add(database)
        registry.update_pause()
        what = f"database {database}" if database else "all databases"
        log.info("PAUSE %s: waiting for the transactions in flight to finish", what)
        pools = self._pools(database)
        try:
            await self._wait(lambda: all(not p.servers and not p.connecting for p in pools),
                             cancelled)  # fmt: skip
        except Cancelled:
            # Like PgBouncer: cancelling a PAUSE that waits resumes.
            if database is None:
                registry.paused = False
            else:
                registry.paused_databases.discard(database)
            registry.update_pause()
            log.info("PAUSE %s cancelled by the admin: resumed", what)
            raise
        log.info("PAUSE %s: done, no server connections left", what)
        return "PAUSE"

    def _resume(self, arg: str | None, cancelled: asyncio.Event) -> str:
        registry = self.registry
        if registry.shutting_down:
            raise AdminError("pooler is shutting down")
        database = self._database(arg, "resume")
        if database is None:
            if not registry.paused:
                paused = sorted(registry.paused_databases)
                raise AdminError(
                    "pooler is not paused/suspended",
                    hint=f"paused databases need RESUME <db>: {', '.join(paused)}"
                    if paused
                    else None,
                )
            registry.paused = False
        else:
            if database not in registry.paused_databases:
                raise AdminError(f"database {database} is not paused")
            registry.paused_databases.discard(database)
        registry.update_pause()
        log.info("RESUME %s", database or "all databases")
        return "RESUME"

    def _disable(self, arg: str | None, cancelled: asyncio.Event) -> str:
        database = self._database(arg, "disable", required=True)
        assert database is not None
        self.registry.disabled_databases.add(database)
        log.info("DISABLE %s: new logins to it are refused", database)
        return "DISABLE"

    def _enable(self, arg: str | None, cancelled: asyncio.Event) -> str:
        database = self._database(arg, "enable", required=True)
        assert database is not None
        self.registry.disabled_databases.discard(database)
        log.info("ENABLE %s", database)
        return "ENABLE"

    def _reconnect(self, arg: str | None, cancelled: asyncio.Event) -> str:
        database = self._database(arg, "reconnect")
        for pool in self._pools(database):
            pool.new_generation("RECONNECT")
        log.info("RECONNECT %s: servers close as they are released", database or "all")
        return "RECONNECT"

    async def _wait_close(self, arg: str | None, cancelled: asyncio.Event) -> str:
        database = self._database(arg, "wait in")
        pools = self._pools(database)
        await self._wait(lambda: all(not p.old_servers() for p in pools), cancelled)
        return "WAIT_CLOSE"

    def _kill(self, arg: str | None, cancelled: asyncio.Event) -> str:
        registry = self.registry
        database = self._database(arg, "kill")
        if registry.paused:
            raise AdminError("already suspended/paused", hint="RESUME first")
        names = [database] if database else list(registry.config.databases)
        registry.paused_databases.update(names)
        registry.update_pause()
        what = f"KILL {database}" if database else "KILL"
        error = ProxyError(
            f"terminated by the admin console ({what}); reconnect once the database is resumed",
            sqlstate="57P01",  # admin_shutdown
            reason="admin_kill",
        )
        clients = 0
        for client in list(registry.clients):
            pool = client.pool
            if pool is not None and pool.settings.database.name in names:
                client.fail(error)
                clients += 1
        servers = 0
        for pool in self._pools(database):
            for server in list(pool.servers):
                server.close(f"{what} from the admin console")
                servers += 1
        log.warning(
            "%s: %d clients and %d servers closed; %s paused until RESUME",
            what,
            clients,
            servers,
            ", ".join(names),
        )
        return "KILL"

    def _kill_client(self, arg: str | None, cancelled: asyncio.Event) -> str:
        client_id = parse_client_id(arg)
        for client in list(self.registry.clients):
            if client.id == client_id:
                client.fail(
                    ProxyError(
                        f"terminated by the admin console (KILL_CLIENT {client_id})",
                        sqlstate="57P01",  # admin_shutdown
                        reason="admin_kill",
                    )
                )
                log.warning("KILL_CLIENT %d: %s closed", client_id, client)
                return "KILL_CLIENT"
        raise AdminError("client not found", hint="SHOW CLIENTS lists the ids")

    def _reload(self, arg: str | None, cancelled: asyncio.Event) -> str:
        try:
            self.lifecycle.reload()
        except ConfigError as exc:
            raise AdminError(
                f"RELOAD failed: {exc}",
                sqlstate="F0000",  # config_file_error
                hint="the old configuration keeps running; fix the file and RELOAD again",
            ) from None
        return "RELOAD"

    def _shutdown(self, arg: str | None, cancelled: asyncio.Event) -> str:
        self.lifecycle.shutdown_requested(arg or "")
        return "SHUTDOWN"

    def _set(self, arg: str | None, cancelled: asyncio.Event) -> str:
        assert arg is not None
        key, _, value = arg.partition("=")
        try:
            config = set_value(self.registry.config, key, value)
        except ConfigError as exc:
            raise AdminError(f"SET failed: {exc}") from None
        self.lifecycle.apply_config(config)
        log.info("SET %s = %r", key, value)
        return f"SET {key}={value}"


def parse_client_id(arg: str | None) -> int:
    if arg is None or not arg.isdigit():
        raise AdminError(
            "invalid client id supplied" if arg else "a client id is required",
            hint="KILL_CLIENT takes an id from SHOW CLIENTS",
        )
    return int(arg)
