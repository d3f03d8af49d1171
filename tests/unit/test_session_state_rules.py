"""Session state on text alone: DEALLOCATE names, refusals, and the cheap trigger scans."""

from __future__ import annotations

import pytest

from proxy.session_state import (
    ANY_TRIGGER,
    FORGET_STATEMENTS_TAGS,
    FORGETS_STATEMENTS,
    REASONS,
    STATE_QUERY,
    STATE_TAGS,
    TEXT_TRIGGER,
    deallocated_name,
    refusal,
)


class TestDeallocatedName:
    @pytest.mark.parametrize(
        ("sql", "name"),
        [
            (b"DEALLOCATE s1", b"s1"),
            (b"DEALLOCATE PREPARE s1", b"s1"),
            (b"deallocate prepare s1;", b"s1"),
            (b"  \n DEALLOCATE\tPREPARE\ns$1 ;\n", b"s$1"),
            (b"DeAlLoCaTe PrEpArE Stmt_1", b"stmt_1"),  # unquoted names fold to lowercase
            (b"DEALLOCATE _x9", b"_x9"),
            (b'DEALLOCATE "My""Name"', b'My"Name'),  # quoted: case kept, "" unescaped
            (b'DEALLOCATE PREPARE "with space;"', b"with space;"),
            (b'DEALLOCATE "ALL"', b"ALL"),  # a statement called ALL, not the keyword
            (b'deallocate "all"', b"all"),
            (b"DEALLOCATE prepare", b"prepare"),  # PREPARE is unreserved: a name here
        ],
    )
    def test_one_statement(self, sql: bytes, name: bytes) -> None:
        assert deallocated_name(sql) == name
        # prepared.py only looks when the cheap scan hits: it must hit for every form.
        assert ANY_TRIGGER.search(sql.lower())
        assert FORGETS_STATEMENTS.search(sql)

    @pytest.mark.parametrize(
        "sql",
        [
            b"DEALLOCATE ALL",
            b"deallocate all",
            b"DEALLOCATE PREPARE ALL;",
            b"DeAlLoCaTe AlL",
            b"DEALLOCATE",
            b'DEALLOCATE ""',  # a zero-length identifier is an error, not a name
            b"DEALLOCATE 1abc",
            b"DEALLOCATEs1",
            b"DEALLOCATE s1 s2",
            b"DEALLOCATE s1; SELECT 1",  # more than one statement: the server's business
            b"SELECT 1; DEALLOCATE s1",
            b"DEALLOCATE s1 -- bye",
            b"DISCARD ALL",
            b"PREPARE s1 AS SELECT 1",
            b"select 'DEALLOCATE s1'",
        ],
    )
    def test_not_one_statement(self, sql: bytes) -> None:
        assert deallocated_name(sql) is None


TEMP = "temporary tables"
ADVISORY = "session advisory locks"
LISTEN = "LISTEN"
HOLD = "cursors WITH HOLD"
PREPARE = "SQL-level PREPARE"
LOAD = "LOAD"


class TestRefusal:
    @pytest.mark.parametrize(
        ("sql", "feature"),
        [
            (b"CREATE TEMP TABLE t (x int)", TEMP),
            (b"create temporary table t (x int)", TEMP),
            (b"CREATE GLOBAL TEMPORARY TABLE t (x int)", TEMP),
            (b"CREATE LOCAL TEMP TABLE IF NOT EXISTS t (x int)", TEMP),
            (b"CREATE TEMP TABLE t AS SELECT 1", TEMP),
            (b"CREATE TEMP TABLE t (x int) ON COMMIT DELETE ROWS", TEMP),
            (b"CREATE TEMP TABLE t (x int) ON COMMIT PRESERVE ROWS", TEMP),
            (b"SELECT * INTO TEMP t FROM src", TEMP),
            (b"select * into temporary table t from src", TEMP),
            (b"SELECT pg_advisory_lock(1)", ADVISORY),
            (b"SELECT pg_catalog.pg_advisory_lock (1, 2)", ADVISORY),
            (b"select pg_try_advisory_lock(42)", ADVISORY),
            (b"SELECT PG_ADVISORY_LOCK_SHARED(1)", ADVISORY),
            (b"SELECT pg_try_advisory_lock_shared(1)", ADVISORY),
            (b"LISTEN chan", LISTEN),
            (b"  listen chan;", LISTEN),
            (b"BEGIN; LISTEN chan; COMMIT", LISTEN),
            (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", HOLD),
            (b"declare c no scroll cursor with\n  hold for select 1", HOLD),
            (b"PREPARE q AS SELECT 1", PREPARE),
            (b"select 1;\nprepare q (int) as select $1", PREPARE),
            (b"LOAD 'auto_explain'", LOAD),
            (b"Load '$libdir/plugins/x'", LOAD),
        ],
    )
    def test_refused(self, sql: bytes, feature: str) -> None:
        found = refusal(sql)
        assert found is not None
        assert found[0] == feature
        assert found[1]  # a reason for the client's error message

    @pytest.mark.parametrize(
        "sql",
        [
            # Everyday statements that share words with the refused ones.
            b"SELECT 1",
            b"SELECT temperature, template FROM readings",
            b"INSERT INTO temp_log VALUES (1)",
            b"SELECT listen_port, load_avg, prepared FROM stats",
            b"SELECT * FROM pg_prepared_xacts",
            b"SELECT pg_advisory_xact_lock(1)",
            b"SELECT pg_try_advisory_xact_lock_shared(1)",
            b"SELECT pg_advisory_unlock(1), pg_advisory_unlock_all()",
            b"DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
            b"DECLARE c CURSOR FOR SELECT 1",
            b"NOTIFY chan, 'listen'",
            b"CREATE TABLE t (x int)",
            b"CREATE UNLOGGED TABLE t (x int)",
            b"EXECUTE q(1)",
            b"PREPARE TRANSACTION 'gid1'",  # two-phase commit, not a statement
            b"BEGIN; UPDATE t SET x = 1; prepare  transaction 'gid2'",
            # The words only inside string literals.
            b"SELECT 'CREATE TEMP TABLE t (x int)'",
            b"SELECT 'it''s; LISTEN chan'",
            b"SELECT E'it\\'s create temp table x'",
            b"SELECT e'\\\\', 'pg_advisory_lock(1)'",
            b"INSERT INTO log VALUES ('; prepare q as select 1', '; load ''x''')",
            b"SELECT $$ pg_advisory_lock(1) $$",
            b"SELECT $tag$ ; LISTEN chan $tag$",
            b"CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $body$ "
            b"SELECT pg_advisory_lock(1) $body$",
            # ... inside quoted identifiers.
            b'SELECT 1 AS "; listen"',
            b'SELECT x AS "pg_advisory_lock(1)" FROM t',
            b'CREATE TABLE "create temp table x" ("with hold" int)',
            b'SELECT "into temp" FROM t',
            # ... inside comments.
            b"SELECT 1 -- CREATE TEMP TABLE t (x int)",
            b"-- LISTEN chan\nSELECT 1",
            b"SELECT 1 /* ; PREPARE q AS SELECT 1 */",
            b"/* with hold */ DECLARE c CURSOR FOR SELECT 1",
            b"SELECT 1; -- load 'x'",
        ],
    )
    def test_not_refused(self, sql: bytes) -> None:
        assert refusal(sql) is None

    @pytest.mark.parametrize(
        ("sql", "feature"),
        [
            # Blanking literals and comments must not hide what follows them.
            (b"SELECT 'x'; LISTEN chan", LISTEN),
            (b"SELECT E'a\\\\'; LISTEN chan", LISTEN),  # E'a\\' ends at the second quote
            (b"SELECT 'a''b'; PREPARE q AS SELECT 1", PREPARE),
            (b'SELECT "a""b"; LOAD \'x\'', LOAD),
            (b"/* comment */ LISTEN chan", LISTEN),
            (b"-- comment\nLISTEN chan", LISTEN),
            (b"SELECT $$x$$; LISTEN chan", LISTEN),
            (b"SELECT 'x', pg_advisory_lock(1)", ADVISORY),
        ],
    )
    def test_refused_after_literals_and_comments(self, sql: bytes, feature: str) -> None:
        found = refusal(sql)
        assert found is not None and found[0] == feature

    @pytest.mark.parametrize(
        "sql",
        [
            b"CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            b"create temporary table t on commit drop as select 1",
            b"CREATE TEMP TABLE t (x int)\n  ON  COMMIT\tDROP;",
        ],
    )
    def test_on_commit_drop_is_allowed(self, sql: bytes) -> None:
        assert refusal(sql) is None

    @pytest.mark.parametrize(
        ("sql", "feature"),
        [
            # ON COMMIT DROP only counts as SQL, and only excuses the temporary table.
            (b"CREATE TEMP TABLE t (x int) -- ON COMMIT DROP", TEMP),
            (b"CREATE TEMP TABLE t (x int); SELECT 'on commit drop'", TEMP),
            (b'CREATE TEMP TABLE t ("on commit drop" int)', TEMP),
            (b"CREATE TEMP TABLE t (x int) ON COMMIT DROP; LISTEN chan", LISTEN),
            (b"CREATE TEMP TABLE t (x int) ON COMMIT DROP; SELECT pg_advisory_lock(1)", ADVISORY),
        ],
    )
    def test_on_commit_drop_excuses_nothing_else(self, sql: bytes, feature: str) -> None:
        found = refusal(sql)
        assert found is not None and found[0] == feature


class TestTriggers:
    @pytest.mark.parametrize(
        "sql",
        [
            b"SELECT set_config('search_path', 'x', false)",
            b"SELECT SET_CONFIG('a.b', 'c', true)",
            b"SELECT pg_advisory_xact_lock(1)",
            b"CREATE TEMP TABLE t AS SELECT 1",
            b"SELECT * INTO TEMPORARY t FROM src",
        ],
    )
    def test_text_trigger_hits(self, sql: bytes) -> None:
        assert TEXT_TRIGGER.search(sql)

    @pytest.mark.parametrize(
        "sql",
        [b"SELECT 1", b"SELECT temperature FROM t", b"CREATE DATABASE d TEMPLATE template0"],
    )
    def test_text_trigger_misses(self, sql: bytes) -> None:
        assert not TEXT_TRIGGER.search(sql)

    @pytest.mark.parametrize(
        "sql", [b"DEALLOCATE s1", b"deallocate all", b"DISCARD ALL", b"Discard Plans"]
    )
    def test_forgets_statements_hits(self, sql: bytes) -> None:
        assert FORGETS_STATEMENTS.search(sql)

    @pytest.mark.parametrize(
        "sql",
        [
            b"select 1",
            b"begin",
            b"commit",
            b"insert into t values (1, 'x')",
            b"update accounts set balance = balance + 1 where id = $1",
            b"set search_path = app",
        ],
    )
    def test_any_trigger_skips_ordinary_queries(self, sql: bytes) -> None:
        # The point of the cheap scan: most queries pay one search and go on.
        assert not ANY_TRIGGER.search(sql)


# Varied statements, in every case: ANY_TRIGGER on the lowercased text must find at
# least what TEXT_TRIGGER and FORGETS_STATEMENTS find on the original.
CORPUS = [
    b"SELECT 1",
    b"select * from users where id = $1",
    b"INSERT INTO t VALUES (1, 'abc')",
    b"UPDATE t SET x = x + 1",
    b"BEGIN",
    b"COMMIT",
    b"SET search_path = app",
    b"SELECT set_config('a.b', 'c', false)",
    b"SELECT SET_CONFIG('a.b', 'c', true)",
    b"select Set_Config('x.y', '1', false)",
    b"SELECT pg_advisory_lock(1)",
    b"SELECT PG_ADVISORY_XACT_LOCK(1)",
    b"select pg_try_Advisory_lock(1)",
    b"CREATE TEMP TABLE t (x int)",
    b"create temporary table t (x int) on commit drop",
    b"CREATE TEMPORARY TABLE t AS SELECT 1",
    b"SELECT * INTO TEMP t FROM src",
    b"select * into Temporary t from src",
    b"CREATE TEMP VIEW v AS SELECT 1",
    b"SELECT temperature FROM readings",
    b"CREATE DATABASE d TEMPLATE template0",
    b"DEALLOCATE s1",
    b"DEALLOCATE PREPARE ALL",
    b'deallocate "My""Name"',
    b"DISCARD ALL",
    b"Discard Temp",
    b"discard plans",
    b"SELECT 'deallocate' AS word",
    b"LISTEN chan",
    b"PREPARE q AS SELECT 1",
    b"DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    b"SELECT 1 /* ADVISORY */",
]


@pytest.mark.parametrize("sql", CORPUS)
def test_any_trigger_is_a_superset(sql: bytes) -> None:
    if TEXT_TRIGGER.search(sql) or FORGETS_STATEMENTS.search(sql):
        assert ANY_TRIGGER.search(sql.lower())


def test_superset_corpus_is_not_vacuous() -> None:
    # Both sides of the implication occur, or the check above could not fail.
    text = [sql for sql in CORPUS if TEXT_TRIGGER.search(sql)]
    forgets = [sql for sql in CORPUS if FORGETS_STATEMENTS.search(sql)]
    neither = [sql for sql in CORPUS if sql not in text and sql not in forgets]
    assert len(text) >= 10 and len(forgets) >= 6 and len(neither) >= 8
    assert any(sql != sql.lower() for sql in text + forgets)  # mixed case is exercised
    assert not any(ANY_TRIGGER.search(sql.lower()) for sql in neither[:6])


class TestTags:
    @pytest.mark.parametrize(
        "tag",
        [
            b"SET",
            b"RESET",
            b"LISTEN",
            b"UNLISTEN",
            b"PREPARE",
            b"DEALLOCATE",
            b"DEALLOCATE ALL",
            b"LOAD",
            b"DISCARD ALL",
            b"DISCARD TEMP",
            b"DECLARE CURSOR",
            b"CLOSE CURSOR",
            b"CREATE TABLE",
            b"DROP TABLE",
        ],
    )
    def test_state_tags(self, tag: bytes) -> None:
        assert tag in STATE_TAGS

    @pytest.mark.parametrize(
        "tag", [b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"BEGIN", b"COMMIT", b"NOTIFY"]
    )
    def test_ordinary_tags_are_not_state_tags(self, tag: bytes) -> None:
        assert tag not in STATE_TAGS

    def test_forget_statements_tags(self) -> None:
        # Only these drop every prepared statement; DISCARD PLANS / TEMP keep them.
        assert sorted(FORGET_STATEMENTS_TAGS) == [b"DEALLOCATE ALL", b"DISCARD ALL"]
        assert FORGET_STATEMENTS_TAGS <= STATE_TAGS
        for tag in FORGET_STATEMENTS_TAGS:
            assert FORGETS_STATEMENTS.search(tag)
            assert ANY_TRIGGER.search(tag.lower())

    def test_reasons_name_state_query_rows(self) -> None:
        for kind in REASONS:
            assert f"SELECT '{kind.decode()}'" in STATE_QUERY
