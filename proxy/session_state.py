"""Session state in transaction pooling: what a client's session holds beyond a
transaction, and how pgmux learns it.

Settings (SET, RESET, set_config) are replayed on whichever server the client gets
next. State that cannot be replayed (temporary tables, session advisory locks,
LISTEN, cursors WITH HOLD, SQL-level PREPARE, LOAD) pins the server to the client
until it is cleared, or (``session_state = "error"``) is refused before it runs.

pgmux does not parse SQL to learn the state. A CommandComplete tag or a keyword in
the query text only says "look"; at the end of that transaction one query asks the
server what the session really holds (``STATE_QUERY``), and that answer is the truth.
"""

from __future__ import annotations

import re

# CommandComplete tags after which the session may hold state worth a look.
STATE_TAGS = frozenset(
    (
        b"SET",
        b"RESET",
        b"LISTEN",
        b"UNLISTEN",
        b"PREPARE",
        b"DEALLOCATE",
        b"LOAD",
        b"DEALLOCATE ALL",
        b"DISCARD ALL",
        b"DISCARD TEMP",
        b"DISCARD PLANS",
        b"DISCARD SEQUENCES",
        b"DECLARE CURSOR",
        b"CLOSE CURSOR",
        b"CLOSE CURSOR ALL",
        b"CREATE TABLE",
        b"DROP TABLE",
    )
)
# Queries after which the client's statement names may be gone: later pipelined
# requests wait until it is answered (prepared.rewrite_requests).
FORGETS_STATEMENTS = re.compile(rb"deallocate|discard", re.IGNORECASE)
# Tags after which every prepared statement of the session is gone.
FORGET_STATEMENTS_TAGS = frozenset((b"DISCARD ALL", b"DEALLOCATE ALL"))
LOAD_TAG = b"LOAD"

# Work whose tag says nothing (SELECT ...): set_config(), session advisory locks,
# CREATE TEMP TABLE AS / SELECT INTO TEMP. A false hit costs one extra query.
TEXT_TRIGGER = re.compile(rb"set_config|advisory|\btemp(?:orary)?\b", re.IGNORECASE)
# A superset of both, for the lowercased text: most queries match neither and pay for
# one search only (case-sensitive, so the engine can skip to the letters d, s, a, t).
ANY_TRIGGER = re.compile(rb"d(?:eallocate|iscard)|set_config|advisory|temp")

# One round trip that tells everything: session-level settings, and each kind of
# state that cannot follow the client to another server.
STATE_QUERY = """\
SELECT 's', name, setting FROM pg_catalog.pg_settings WHERE source = 'session'
UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role')
  WHERE pg_catalog.current_setting('role') <> 'none'
UNION ALL SELECT 'u', session_user::text, NULL
UNION ALL SELECT 't', c.relname::text, NULL FROM pg_catalog.pg_class c
  WHERE c.relpersistence = 't' AND c.relnamespace = pg_catalog.pg_my_temp_schema()
UNION ALL SELECT 'a', l.objid::text, NULL FROM pg_catalog.pg_locks l
  WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid()
UNION ALL SELECT 'l', c, NULL FROM pg_catalog.pg_listening_channels() c
UNION ALL SELECT 'c', name, NULL FROM pg_catalog.pg_cursors WHERE is_holdable
UNION ALL SELECT 'p', name, NULL FROM pg_catalog.pg_prepared_statements WHERE from_sql"""

# pg_settings hides "role" (GUC_NO_SHOW_ALL), hence its own row; "u" is session_user,
# which SET SESSION AUTHORIZATION changes (superuser only; pins, never replayed).
SESSION_USER = b"u"
SESSION_AUTHORIZATION_REASON = "SET SESSION AUTHORIZATION"

REASONS = {
    b"t": "temporary table",
    b"a": "session advisory lock",
    b"l": "LISTEN",
    b"c": "cursor WITH HOLD",
    b"p": "SQL-level PREPARE",
}
LOAD_REASON = "LOAD"

# session_state = "error": statements refused before they run, with why.
_REFUSALS = (
    (
        re.compile(
            rb"\bcreate\s+(?:(?:global|local)\s+)?temp(?:orary)?\s+table\b"
            rb"|\binto\s+temp(?:orary)?\b",
            re.IGNORECASE,
        ),
        "temporary tables",
        "a temporary table lives in one server session and would vanish or leak between "
        "clients (ON COMMIT DROP tables are fine)",
    ),
    (
        re.compile(rb"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.IGNORECASE),
        "session advisory locks",
        "a session lock would stay with the server after the transaction "
        "(pg_advisory_xact_lock is fine)",
    ),
    (
        re.compile(rb"(?:^|;)\s*listen\b", re.IGNORECASE),
        "LISTEN",
        "notifications go to one server session, not to the client",
    ),
    (
        re.compile(rb"\bwith\s+hold\b", re.IGNORECASE),
        "cursors WITH HOLD",
        "a holdable cursor outlives the transaction on one server session",
    ),
    (
        re.compile(rb"(?:^|;)\s*prepare\b(?!\s+transaction\b)", re.IGNORECASE),
        "SQL-level PREPARE",
        "the statement would exist on one server session only (protocol-level prepared "
        "statements are fine)",
    ),
    (
        re.compile(rb"(?:^|;)\s*load\b", re.IGNORECASE),
        "LOAD",
        "a loaded library stays in one server session",
    ),
)
_ON_COMMIT_DROP = re.compile(rb"\bon\s+commit\s+drop\b", re.IGNORECASE)


# String literals (with '' and E'\\' escapes), quoted identifiers, dollar-quoted
# bodies and comments: words inside them are not SQL, so they are blanked first.
_NOT_SQL = re.compile(
    rb"""(?xs)
      [eE]'(?:[^'\\]|\\.|'')*'
    | '(?:[^']|'')*'
    | "(?:[^"]|"")*"
    | (\$[A-Za-z_0-9]*\$).*?\1
    | --[^\n]*
    | /\*.*?\*/
    """
)


def refusal(sql: bytes) -> tuple[str, str] | None:
    """(feature, reason) when ``sql`` would create state that cannot follow a client."""
    code = _NOT_SQL.sub(b" ", sql)
    for pattern, feature, reason in _REFUSALS:
        if pattern.search(code):
            if feature == "temporary tables" and _ON_COMMIT_DROP.search(code):
                continue
            return feature, reason
    return None


# SQL DEALLOCATE of one statement: for a protocol-level statement pgmux renamed, pgmux
# forgets the mapping and answers DEALLOCATE itself (psycopg with libpq < 17 does this).
DEALLOCATE_ONE = re.compile(
    rb'(?is)\A\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([a-z_][a-z0-9_$]*))\s*;?\s*\Z'
)


def deallocated_name(sql: bytes) -> bytes | None:
    """The statement name of ``DEALLOCATE [PREPARE] name`` (not ALL), else None."""
    match = DEALLOCATE_ONE.match(sql)
    if match is None:
        return None
    if match.group(1) is not None:
        return match.group(1).replace(b'""', b'"')
    name = match.group(2).lower()
    return None if name == b"all" else name
