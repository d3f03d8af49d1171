"""pgmux's admin console in the tests: the users it admits, and its commands over psycopg.

- ``ADMIN_USERS``: config overrides giving pgmux an admin (``admin`` / ``adminpw``, in the
  default config's admin_users) and a stats user (``watcher`` / ``watchpw``), with a
  query_wait_timeout long enough for requests held by PAUSE.
- ``start_with_admin(factory, **overrides)``: a pgmux with those users.
- ``show``: a SHOW command's rows as dicts; ``command``: a control command's tag;
  ``refused``: the ERROR a command is refused with.
- ``Console``: the type of the ``console`` fixture (tests/conftest.py), which opens console
  sessions and closes them after the test.
"""

from __future__ import annotations

from typing import Any, Protocol

import psycopg
import pytest
from psycopg.rows import dict_row

from .pgbouncer import ADMIN_PASSWORD, ADMIN_USER, WATCHER_PASSWORD, WATCHER_USER
from .pgmux import PgmuxFactory, PgmuxProcess, deep_merge

Admin = psycopg.AsyncConnection[Any]

ADMIN_USERS: dict[str, Any] = {
    "users": {
        ADMIN_USER: {"password": ADMIN_PASSWORD},
        WATCHER_USER: {"password": WATCHER_PASSWORD},
    },
    "stats_users": [WATCHER_USER],
    # PAUSE holds requests in the queue, where query_wait_timeout still counts.
    "query_wait_timeout": 60,
}


def start_with_admin(factory: PgmuxFactory, **overrides: Any) -> PgmuxProcess:
    return factory(deep_merge(ADMIN_USERS, overrides))


class Console(Protocol):
    """The ``console`` fixture: a session on pgmux's admin console, closed after the test."""

    async def __call__(
        self, pgmux: PgmuxProcess, user: str = ADMIN_USER, password: str = ADMIN_PASSWORD
    ) -> Admin: ...


async def show(admin: Admin, what: str) -> list[dict[str, Any]]:
    async with admin.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SHOW {what}")
        return await cur.fetchall()


async def command(admin: Admin, text: str) -> str | None:
    """Run a control command; its CommandComplete tag."""
    async with admin.cursor() as cur:
        await cur.execute(text)
        return cur.statusmessage


async def refused(admin: Admin, text: str) -> psycopg.Error:
    """The ERROR a console command is refused with."""
    with pytest.raises(psycopg.Error) as info:
        await command(admin, text)
    return info.value
