"""Several hosts per database: which one a new server connection tries next, and whether
the server that answered is the kind ``target_session_attrs`` asks for (libpq's rules).

Pure: no sockets and no clock of its own (callers pass ``now``). server.py walks a
``Walk`` through the hosts, one server connection per host tried; ``HostList`` is the
pool's memory across walks: the round-robin cursor, and which hosts failed or were of
the wrong kind lately, so they are tried last or checked again only after a while.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import NoMatchingServer, ProxyError, ServerUnreachable

# Reported by PostgreSQL 14+ at login and whenever they change (GUC_REPORT).
HOT_STANDBY = "in_hot_standby"
READ_ONLY = "default_transaction_read_only"
ROLE_PARAMETERS = frozenset((HOT_STANDBY, READ_ONLY))
# Targets a server can stop matching while it is open (prefer-standby takes any server).
WATCHED_TARGETS = frozenset(("read-write", "read-only", "primary", "standby"))

# A host of the wrong kind is asked again after this many seconds, by one walk at a
# time: roles change (a failover promotes a standby), but a pool opening servers must
# not log in to a standby for every one of them.
RECHECK = 1.0
# A walk that found no host of the right kind while one answered with the wrong kind
# (a failover under way) looks again, no sooner than this.
MIN_WAIT = 0.05

Address = tuple[str, int]


def address_text(host: str, port: int) -> str:
    """``host:port`` as log lines and errors show it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- is the server the right kind ---------------------------------------------------------


def role_verdict(target: str, params: Mapping[str, str]) -> bool | None:
    """Whether a server whose ParameterStatus values are ``params`` suits ``target``;
    None when they do not tell (PostgreSQL before 14): then ask with ``check_query``."""
    if target in ("any", "prefer-standby"):
        return True
    hot = params.get(HOT_STANDBY)
    if target in ("primary", "standby"):
        if hot is None:
            return None
        return (hot == "on") == (target == "standby")
    read_only = params.get(READ_ONLY)
    if hot is None or read_only is None:
        return None
    is_read_only = hot == "on" or read_only == "on"
    return is_read_only == (target == "read-only")


def mismatch_reason(target: str, params: Mapping[str, str]) -> str:
    """libpq's words for a server ``role_verdict`` refused."""
    if target == "read-write":
        if params.get(HOT_STANDBY) == "on":
            return "server is in hot standby mode"
        return "session is read-only"
    if target == "read-only":
        return "session is not read-only"
    if target == "primary":
        return "server is in hot standby mode"
    return "server is not in hot standby mode"


def check_query(target: str) -> str:
    """What libpq asks a server that does not report its role (PostgreSQL before 14)."""
    if target in ("read-write", "read-only"):
        return "SHOW transaction_read_only"
    return "SELECT pg_catalog.pg_is_in_recovery()"


def query_verdict(target: str, value: str | None) -> tuple[bool, str]:
    """``check_query``'s one value judged for ``target``: (suits, libpq's words if not)."""
    if target in ("any", "prefer-standby"):
        return True, ""
    if target in ("read-write", "read-only"):
        read_only = value == "on"
        if read_only == (target == "read-only"):
            return True, ""
        return False, "session is read-only" if read_only else "session is not read-only"
    in_recovery = value == "t"
    if in_recovery == (target == "standby"):
        return True, ""
    return False, "server is in hot standby mode" if in_recovery else (
        "server is not in hot standby mode"
    )


# -- which host next ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Try:
    """One host to try, and the kind of server wanted there (prefer-standby asks for a
    standby first, then for any)."""

    host: str
    port: int
    target: str

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def __str__(self) -> str:
        return address_text(self.host, self.port)


class HostList:
    """A pool's hosts, its load_balance_hosts and target_session_attrs, and what each
    host did lately. One per pool; server.py replaces it when a reload changes them."""

    def __init__(
        self,
        hosts: Sequence[Address],
        load_balance: str,
        target: str,
        *,
        shuffle: Callable[[list[Address]], None] = random.shuffle,
    ) -> None:
        self.hosts = tuple(hosts)
        self.load_balance = load_balance
        self.target = target
        self._shuffle = shuffle
        self.cursor = 0  # round-robin: where the next walk starts
        # When each host last failed (could not connect or log in), and when it was
        # last found of the wrong kind, or claimed by a walk to be checked again.
        self.failed_at: dict[Address, float] = {}
        self.rejected_at: dict[Address, float] = {}
        self.rejected_why: dict[Address, str] = {}

    def same(self, hosts: Sequence[Address], load_balance: str, target: str) -> bool:
        return (self.hosts, self.load_balance, self.target) == (tuple(hosts), load_balance, target)

    def walk(self, now: float, retry_after: float) -> Walk:
        """A new server connection's way through the hosts. ``retry_after``: how long a
        failed host is tried after the others (server_login_retry)."""
        return Walk(self, now, retry_after)

    def order(self, now: float, retry_after: float, *, advance: bool) -> list[Address]:
        """Hosts in the order to try: the configured order, turned by the round-robin
        cursor or shuffled; hosts that failed within ``retry_after`` go last."""
        hosts = list(self.hosts)
        if self.load_balance == "round-robin" and len(hosts) > 1:
            start = self.cursor % len(hosts)
            hosts = hosts[start:] + hosts[:start]
            if advance:
                self.cursor = start + 1
        elif self.load_balance == "random":
            self._shuffle(hosts)
        failed = self.failed_at

        def recently_failed(host: Address) -> bool:
            at = failed.get(host)
            return at is not None and now - at < retry_after

        return sorted(hosts, key=recently_failed)  # stable: the order is kept otherwise

    def known_wrong(self, host: Address, now: float) -> bool:
        """Found of the wrong kind (or being checked by another walk) within RECHECK."""
        at = self.rejected_at.get(host)
        return at is not None and now - at < RECHECK

    def next_check(self, now: float) -> float | None:
        """Seconds until a host of the wrong kind may be checked again (None: none is)."""
        if not self.rejected_at:
            return None
        return max(min(self.rejected_at.values()) + RECHECK - now, MIN_WAIT)

    def succeeded(self, host: Address) -> None:
        self.failed_at.pop(host, None)
        self.rejected_at.pop(host, None)
        self.rejected_why.pop(host, None)


@dataclass(slots=True)
class Outcome:
    """What one host did in a walk."""

    text: str  # "server is in hot standby mode", "cannot connect: Connection refused"
    error: ProxyError | None = None  # None: the wrong kind of server
    hard: bool = False  # a refusal server_login_retry applies to (a wrong password)


@dataclass(slots=True)
class Walk:
    """One server connection's way through the host list (libpq's connection attempt):
    each host once, in ``HostList.order``; with prefer-standby the hosts that answered
    once more for any kind of server. A walk that found only servers of the wrong kind
    can start a new round a little later (``wait``): a failover may be under way."""

    hosts: HostList
    started: float
    retry_after: float
    queue: list[Try] = field(default_factory=list)
    outcomes: dict[Address, Outcome] = field(default_factory=dict)
    second_pass: bool = False
    rounds: int = 0
    tried: int = 0  # hosts tried in this round (not skipped as known to be the wrong kind)

    def __post_init__(self) -> None:
        self._new_round(self.started, advance=True)

    def _new_round(self, now: float, *, advance: bool) -> None:
        hosts = self.hosts
        first = "standby" if hosts.target == "prefer-standby" else hosts.target
        order = hosts.order(now, self.retry_after, advance=advance)
        self.queue = [Try(host, port, first) for host, port in order]
        self.outcomes = {}
        self.second_pass = False
        self.rounds += 1
        self.tried = 0

    def next(self, now: float) -> Try | None:
        """The next host to try in this round, or None when the round is over."""
        hosts = self.hosts
        while self.queue:
            attempt = self.queue.pop(0)
            where = attempt.address
            if attempt.target != "any" and hosts.target != "any":
                if hosts.known_wrong(where, now):
                    why = hosts.rejected_why.get(where, "of the wrong kind")
                    self.outcomes[where] = Outcome(f"{why} (checked again in a moment)")
                    continue
                if where in hosts.rejected_at:
                    hosts.rejected_at[where] = now  # this walk checks it again; others wait
            self.tried += 1
            return attempt
        if hosts.target == "prefer-standby" and not self.second_pass:
            # libpq's second pass: any server will do now. Hosts that could not be
            # reached a moment ago are not tried again in the same walk.
            self.second_pass = True
            self.queue = [
                Try(host, port, "any")
                for (host, port), outcome in self.outcomes.items()
                if outcome.error is None
            ]
            return self.next(now)
        return None

    def failed(self, attempt: Try, text: str, error: ProxyError, now: float, *, hard: bool) -> None:
        """The host could not be reached, or refused the login."""
        where = attempt.address
        self.outcomes[where] = Outcome(text, error, hard)
        self.hosts.failed_at[where] = now
        self.hosts.rejected_at.pop(where, None)  # down is not "the wrong kind": try it
        self.hosts.rejected_why.pop(where, None)

    def rejected(self, attempt: Try, why: str, now: float) -> None:
        """The server is not of the kind wanted (``why``: libpq's words)."""
        self.outcomes[attempt.address] = Outcome(why)
        if attempt.target != "any":
            self.hosts.rejected_at[attempt.address] = now
            self.hosts.rejected_why[attempt.address] = why

    def succeeded(self, attempt: Try) -> None:
        self.hosts.succeeded(attempt.address)

    def wait(self, now: float, budget: float) -> float | None:
        """The round found no server. Seconds to wait before the next round, or None to
        give up: rounds go on only while a host answered with the wrong kind of server
        (a standby not yet promoted), for at most ``budget`` seconds from the start."""
        if self.hosts.target in ("any", "prefer-standby"):
            return None
        if not any(outcome.error is None for outcome in self.outcomes.values()):
            return None  # nothing but outages and refusals: say so at once
        left = self.started + budget - now
        if left <= 0:
            return None
        delay = self.hosts.next_check(now)
        return min(delay if delay is not None else MIN_WAIT, left)

    def restart(self, now: float) -> None:
        """Begin the next round, after ``wait``."""
        self._new_round(now, advance=False)

    def error(self, pool: str, database: str, now: float) -> ProxyError:
        """What the clients waiting for the pool get when the walk gives up."""
        outcomes = self.outcomes
        listed = "; ".join(
            f"{address_text(*where)}: {outcome.text}" for where, outcome in outcomes.items()
        )
        target = self.hosts.target
        if any(outcome.error is None for outcome in outcomes.values()):
            took = now - self.started
            return NoMatchingServer(
                f'no server for pool "{pool}" matches target_session_attrs = {target}: '
                f"{listed}" + (f" (looked for {took:.1f} s)" if self.rounds > 1 else ""),
                hint=f"if a failover is under way, retry in a moment; otherwise list a "
                f"server of that kind in [databases.{database}] host, or change "
                "target_session_attrs",
            )
        errors = [outcome for outcome in outcomes.values() if outcome.error is not None]
        if not errors:
            return ServerUnreachable(
                f'no server of [databases.{database}] was tried for pool "{pool}"'
            )
        if len(self.hosts.hosts) == 1 and len(errors) == 1:
            assert errors[0].error is not None
            return errors[0].error  # one host: its own error, as without a list
        base = next((o for o in errors if o.hard), errors[-1]).error
        assert base is not None
        hint = base.hint
        if isinstance(base, ServerUnreachable) and not isinstance(base, NoMatchingServer):
            hint = (
                f"check that PostgreSQL is running on one of [databases.{database}] host and port"
            )
        error = type(base)(
            f'no server of [databases.{database}] could be used for pool "{pool}": {listed}',
            detail=base.detail,
            hint=hint,
            sqlstate=base.sqlstate,
        )
        error.reason = base.reason  # the hosts' own kind of failure
        return error
