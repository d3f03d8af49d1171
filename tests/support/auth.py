"""Helpers for the authentication tests: secrets, auth files, traced logins, unix sockets.

- ``md5_hash(user, password)``: the md5 secret PostgreSQL stores ("md5" + 32 hex digits).
- ``role_secret(pg, role)``: a role's ``rolpassword`` as stored in ``pg_authid``.
- ``write_userlist(path, entries)``: a PgBouncer userlist.txt (quotes doubled).
- ``write_hba(path, *lines)``: an auth_hba_file.
- ``CountingAuthFunction``: a SECURITY DEFINER auth function that logs each call, so a
  test can count how often pgmux ran auth_query.
- ``TracingClient``: a ``RawClient`` that remembers every message it read, e.g. which
  authentication requests pgmux sent (``auth_codes``).
- ``unix_psql`` / ``unix_conninfo``: psql and libpq over pgmux's unix socket.
- ``only_users(config_users)``: overrides that replace the whole ``[users]`` table.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .helpers import tool_env
from .pgcluster import APP_DB, APP_USER, AUTH_USER, PgCluster, find_client_tool
from .pgmux import PgmuxProcess
from .wire import RawClient, parse_fields, startup_packet

# -- secrets -----------------------------------------------------------------------------


def md5_hash(user: str, password: str) -> str:
    """``"md5" + md5(password + user)``: what pg_authid stores for an md5 password."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def role_secret(pg: PgCluster, role: str) -> str:
    """The role's stored secret (SCRAM secret or md5 hash) from ``pg_authid``."""
    literal = "'" + role.replace("'", "''") + "'"
    secret = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = {literal}", "postgres")
    assert secret, f"role {role!r} has no password"
    return secret


def only_users(users: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Overrides under which ``[users]`` holds exactly ``users`` (the defaults removed).

    ``pgmux_factory`` merges overrides into the default config, which already lists
    app and md5user; deleting a key takes ``None``, so both are deleted first unless
    ``users`` lists them again.
    """
    table: dict[str, Any] = {"app": None, "md5user": None}
    table.update({name: dict(entry) for name, entry in users.items()})
    return {"users": table}


# -- files -------------------------------------------------------------------------------


def _quoted(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def write_userlist(
    path: Path, entries: Mapping[str, str] | Iterable[tuple[str, str]], *, raw: str = ""
) -> Path:
    """Write a PgBouncer auth_file: one ``"user" "secret"`` line per entry, then ``raw``."""
    pairs = entries.items() if isinstance(entries, Mapping) else entries
    lines = ["; written by the pgmux tests"]
    lines += [f"{_quoted(user)} {_quoted(secret)}" for user, secret in pairs]
    path.write_text("\n".join(lines) + "\n" + raw)
    return path


def write_hba(path: Path, *lines: str) -> Path:
    path.write_text("# written by the pgmux tests\n" + "\n".join(lines) + "\n")
    return path


# -- auth_query --------------------------------------------------------------------------


class CountingAuthFunction:
    """An auth_query target (in database app) that records every call in a table.

    Like ``support.pgcluster``'s AUTH_FUNCTION (SECURITY DEFINER, owned by the
    superuser, executable by authuser only, NULL secret for expired roles), plus an
    INSERT into its own log table and an optional ``pg_sleep`` so that concurrent
    logins overlap a lookup in flight.
    """

    def __init__(self, pg: PgCluster, *, sleep: float = 0.0) -> None:
        self.pg = pg
        suffix = uuid.uuid4().hex[:10]
        self.function = f"public.pgmux_counted_auth_{suffix}"
        self.table = f"public.pgmux_auth_calls_{suffix}"
        sleep_sql = f"PERFORM pg_catalog.pg_sleep({sleep});" if sleep else ""
        pg.psql(
            f"CREATE TABLE {self.table} (who text NOT NULL, at timestamptz"
            " NOT NULL DEFAULT pg_catalog.clock_timestamp());"
            f"CREATE FUNCTION {self.function}(username text)"
            " RETURNS TABLE(usename name, passwd text)"
            " LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
            " AS $$ BEGIN"
            f" INSERT INTO {self.table} (who) VALUES (username);"
            f" {sleep_sql}"
            " RETURN QUERY SELECT a.rolname, CASE WHEN a.rolvaliduntil IS NULL"
            " OR a.rolvaliduntil >= now() THEN a.rolpassword END"
            " FROM pg_catalog.pg_authid a WHERE a.rolname = username AND a.rolcanlogin;"
            " END $$;"
            f"REVOKE ALL ON FUNCTION {self.function}(text) FROM PUBLIC;"
            f"GRANT EXECUTE ON FUNCTION {self.function}(text) TO {AUTH_USER};",
            dbname=APP_DB,
        )

    @property
    def query(self) -> str:
        return f"SELECT usename, passwd FROM {self.function}($1)"

    def calls(self, user: str) -> int:
        """How many times the function ran for ``user`` (committed calls)."""
        literal = "'" + user.replace("'", "''") + "'"
        return int(self.pg.psql(f"SELECT count(*) FROM {self.table} WHERE who = {literal}"))

    def drop(self) -> None:
        self.pg.psql(f"DROP FUNCTION IF EXISTS {self.function}(text); DROP TABLE {self.table}")


# -- traced logins -----------------------------------------------------------------------


class TracingClient(RawClient):
    """A RawClient that keeps every message it reads, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.seen: list[tuple[bytes, bytes]] = []

    @classmethod
    async def open_unix(cls, directory: str | Path, port: int) -> TracingClient:
        reader, writer = await asyncio.open_unix_connection(f"{directory}/.s.PGSQL.{port}")
        return cls(reader, writer)

    async def read_message(self, timeout: float = 10) -> tuple[bytes, bytes]:
        typ, body = await super().read_message(timeout)
        self.seen.append((typ, body))
        return typ, body

    @property
    def auth_codes(self) -> list[int]:
        """The authentication request codes received (0 Ok, 3 cleartext, 5 md5, 10 SASL,
        11 SASL continue, 12 SASL final)."""
        return [struct.unpack_from("!I", body)[0] for typ, body in self.seen if typ == b"R"]

    @property
    def errors(self) -> list[dict[str, str]]:
        return [parse_fields(body) for typ, body in self.seen if typ == b"E"]


async def first_auth_request(
    host: str, port: int, user: str, database: str = APP_DB
) -> tuple[int | None, dict[str, str] | None]:
    """Send a startup packet; the first authentication request code, or the error."""
    async with await TracingClient.open(host, port) as client:
        await client.send(startup_packet({"user": user, "database": database}))
        typ, body = await client.read_message()
        if typ == b"E":
            return None, parse_fields(body)
        assert typ == b"R", (typ, body)
        return struct.unpack_from("!I", body)[0], None


# -- unix sockets ------------------------------------------------------------------------


def unix_conninfo(
    directory: str | Path,
    pgmux: PgmuxProcess,
    user: str = APP_USER,
    dbname: str = APP_DB,
    password: str | None = None,
) -> str:
    conninfo = f"host={directory} port={pgmux.port} user={user} dbname={dbname}"
    if password is not None:
        conninfo += f" password={password}"
    return conninfo + " connect_timeout=15"


def unix_psql(
    directory: str | Path,
    pgmux: PgmuxProcess,
    *args: str,
    user: str = APP_USER,
    dbname: str = APP_DB,
    password: str = "",
    timeout: float = 30,
    os_user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """psql -X -q -A -t over pgmux's unix socket in ``directory`` (no password prompt),
    as the OS user ``os_user`` if given (the tests' own user otherwise; needs root)."""
    command = [find_client_tool("psql"), "-X", "-q", "-A", "-t", "-w",
               "-d", unix_conninfo(directory, pgmux, user, dbname), *args]  # fmt: skip
    return subprocess.run(
        command,
        env=tool_env(password),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        **({"user": os_user} if os_user is not None else {}),
    )
