"""Server connection limits shared by several pools: max_db_connections (the pools of
one database) and max_user_connections (the pools of one server login).

A ``ServerLimit`` counts the servers of its pools, open or connecting. A pool that has
clients waiting but cannot open a server because a shared limit is reached first closes
an idle server of another pool under that limit (as PgBouncer does); when there is none
it waits in the limit's ``blocked`` set. Slots freed later go to the blocked pool whose
oldest client has waited longest, and while some pool is blocked, a pool holding more
than its share closes servers as they are released instead of keeping them: the pools
under one limit end up splitting it, and none starves behind a busy neighbour (PgBouncer
only hands over servers that idle out, so there a busy pool can starve another).

The pool module does the moves (see pool.py); this one only decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import Pool


class ServerLimit:
    """One shared limit: ``max_db_connections`` of a database, or
    ``max_user_connections`` of a user; ``limit`` 0 means none."""

    __slots__ = ("blocked", "count", "key", "limit", "name", "pools")

    def __init__(self, name: str, key: str) -> None:
        self.name = name  # the setting: "max_db_connections" or "max_user_connections"
        self.key = key  # the database or user it limits
        self.limit = 0
        self.count = 0  # servers open or connecting in all its pools
        self.pools: list[Pool] = []
        self.blocked: set[Pool] = set()  # pools with clients waiting for a slot

    def __repr__(self) -> str:
        return f"<ServerLimit {self.describe()}: {self.count}>"

    def describe(self) -> str:
        """``max_db_connections = 10 for database "app"``, for messages."""
        what = "database" if self.name == "max_db_connections" else "user"
        return f'{self.name} = {self.limit} for {what} "{self.key}"'

    def full(self) -> bool:
        return 0 < self.limit <= self.count

    def idle_victim(self, pool: Pool) -> Pool | None:
        """Another pool under this limit with an idle server that can close to make room
        for ``pool``: the one whose idle server has idled longest."""
        best: Pool | None = None
        for other in self.pools:
            if (
                other is not pool
                and other.idle
                and not other.n_waiting
                and (
                    best is None or other.longest_idle().idle_since < best.longest_idle().idle_since
                )
            ):
                best = other
        return best

    def next_blocked(self, other_than: Pool | None = None) -> Pool | None:
        """The blocked pool a free slot goes to: the one holding fewest servers, and of
        those the one whose oldest client has waited longest (pools no longer waiting
        leave the set)."""
        best: Pool | None = None
        best_key = (0, 0.0)
        for pool in list(self.blocked):
            started = pool.oldest_wait()
            if started is None:
                self.blocked.discard(pool)
                continue
            key = (len(pool.servers) + pool.connecting, started)
            if pool.paused or pool is other_than:
                continue  # a paused pool opens nothing: the slot goes to another
            if best is None or key < best_key:
                best, best_key = pool, key
        return best

    def should_yield(self, pool: Pool) -> Pool | None:
        """Some pool is blocked on this limit and ``pool`` is releasing a server: the
        blocked pool the server's slot should go to, or None to keep it. A pool with
        clients waiting keeps its servers while it holds no more than one more than
        that pool: the pools under a limit end up splitting it evenly."""
        taker = self.next_blocked(other_than=pool)
        if taker is None:
            return None
        held = len(pool.servers) + pool.connecting
        if pool.n_waiting and held <= len(taker.servers) + taker.connecting + 1:
            return None
        return taker
