"""The stats model's counters: what the relay and the pool bump, per pool, with plain
increments and no locks, Tasks or clock reads beyond one per request.

Gauges, averages, SHOW rows and Prometheus families are all computed from these when
read (snapshot.py). Times are seconds of ``time.monotonic``; the admin console shows
them in microseconds as PgBouncer does.
"""

from __future__ import annotations

from bisect import bisect_left

# Histogram bucket upper bounds (seconds, Prometheus ``le``), plus +Inf at the end.
WAIT_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip

# The counters a stats period takes differences of (SHOW STATS_AVERAGES, the log line).
PERIOD_FIELDS = (
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "wait_count",
    "server_assignments",
    "client_parses",
    "server_parses",
    "binds",
)


def sqlstate_class(code: str | None) -> str:
    """The two-character class of a SQLSTATE ("57" of "57014"), the only part used as a
    label: a server can raise any five characters, but the classes are few."""
    if code and len(code) == 5 and code[:2].isalnum():
        return code[:2].upper()
    return "??"


class PoolStats:
    """Monotonic counters for one pool (or, on the Registry, for errors no pool owns).

    Kept cheap for the relay, and made whole when read (``totals``):
    - ``query_count``, ``bytes_received`` and ``bytes_sent`` hold what clients that have
      left did; each live client's own counters are added when the stats are read.
    - A transaction of one request (the usual case in transaction pooling) is counted
      once, in ``one_time``/``one_hist``, which count for queries and transactions both;
      ``xact_*`` and ``query_*`` hold only the rest.
    """

    __slots__ = (
        "binds",
        "bytes_received",
        "bytes_sent",
        "client_parses",
        "errors",
        "logins",
        "mark",
        "one_hist",
        "one_time",
        "period",
        "pins",
        "pooler_errors",
        "prepared_hits",
        "prepared_misses",
        "query_count",
        "query_hist",
        "query_time",
        "server_assignments",
        "server_parses",
        "wait_count",
        "wait_hist",
        "wait_time",
        "xact_count",
        "xact_hist",
        "xact_time",
    )

    def __init__(self) -> None:
        self.one_time = 0.0  # seconds spent in transactions of one request
        self.xact_count = 0  # other transactions ended (ReadyForQuery 'I')
        self.xact_time = 0.0  # ... seconds from their first request to their end
        self.query_time = 0.0  # seconds servers were busy with their requests
        self.query_count = 0  # requests answered, of departed clients (see above)
        self.bytes_received = 0  # from departed clients, forwarded to servers
        self.bytes_sent = 0  # relayed to departed clients
        self.wait_time = 0.0  # seconds clients spent queued for a server
        self.wait_count = 0  # times a client was queued and then got a server
        self.server_assignments = 0  # times a server was handed to a client
        self.client_parses = 0  # named Parse messages from clients
        self.server_parses = 0  # named Parse messages pgmux sent to servers
        self.binds = 0  # Bind messages of named statements
        self.prepared_hits = 0  # a named statement the server already had
        self.prepared_misses = 0  # ... that had to be parsed on that server first
        self.logins = 0  # client logins into this pool
        self.errors: dict[str, int] = {}  # server ErrorResponses relayed, by SQLSTATE class
        self.pooler_errors: dict[tuple[str, str], int] = {}  # pgmux's own: (reason, sqlstate)
        self.pins: dict[str, int] = {}  # clients pinned to their server, by reason
        self.wait_hist = [0] * (len(WAIT_BOUNDS) + 1)
        self.one_hist = [0] * (len(DURATION_BOUNDS) + 1)
        self.xact_hist = [0] * (len(DURATION_BOUNDS) + 1)
        self.query_hist = [0] * (len(DURATION_BOUNDS) + 1)
        # Stats periods: the totals at the last boundary, and the last whole period's
        # differences with its length in seconds (None before the first one ends).
        self.mark: dict[str, float] = dict.fromkeys(PERIOD_FIELDS, 0)
        self.period: tuple[float, dict[str, float]] | None = None

    def count_wait(self, waited: float) -> None:
        self.wait_time += waited
        self.wait_count += 1
        self.wait_hist[bisect_left(WAIT_BOUNDS, waited)] += 1

    def count_error(self, sqlstate: str | None) -> None:
        key = sqlstate_class(sqlstate)
        self.errors[key] = self.errors.get(key, 0) + 1

    def count_pooler_error(self, reason: str, sqlstate: str) -> None:
        key = (reason, sqlstate)
        self.pooler_errors[key] = self.pooler_errors.get(key, 0) + 1

    def count_pin(self, reason: str) -> None:
        self.pins[reason] = self.pins.get(reason, 0) + 1

    def totals(self, live: tuple[int, int, int] = (0, 0, 0)) -> dict[str, float]:
        """The PERIOD_FIELDS now. ``live``: the live clients' requests answered, bytes
        received and bytes sent."""
        ones = sum(self.one_hist)
        return {
            "xact_count": self.xact_count + ones,
            "query_count": self.query_count + live[0],
            "bytes_received": self.bytes_received + live[1],
            "bytes_sent": self.bytes_sent + live[2],
            "xact_time": self.xact_time + self.one_time,
            "query_time": self.query_time + self.one_time,
            "wait_time": self.wait_time,
            "wait_count": self.wait_count,
            "server_assignments": self.server_assignments,
            "client_parses": self.client_parses,
            "server_parses": self.server_parses,
            "binds": self.binds,
        }

    def histograms(self) -> dict[str, list[int]]:
        """Bucket counts (the last one +Inf) of queue wait, transaction and query times."""
        one = self.one_hist
        return {
            "wait": list(self.wait_hist),
            "xact": [a + b for a, b in zip(self.xact_hist, one, strict=True)],
            "query": [a + b for a, b in zip(self.query_hist, one, strict=True)],
        }

    def end_period(self, totals: dict[str, float], length: float) -> None:
        """A stats period of ``length`` seconds ended with these ``totals``."""
        mark = self.mark
        if length > 0:
            self.period = (length, {name: totals[name] - mark[name] for name in PERIOD_FIELDS})
        self.mark = totals
