"""pg_hba.conf: parsing PostgreSQL's syntax, first-match semantics, and refusing the rest."""

import ipaddress

import pytest

from proxy.auth import (
    HbaError,
    HbaRule,
    describe_no_match,
    describe_reject,
    match_hba,
    parse_hba,
)

# A pg_hba.conf as an operator might write it for pgmux: every supported form at least once.
FILE = '''\
# TYPE  DATABASE        USER            ADDRESS                 METHOD  [OPTIONS]

# pgmux's unix socket
local   all             postgres                                trust
local   all             all                                     scram-sha-256

# a quoted "all" is the database called all, not the keyword
host    "all"           app             127.0.0.1/32            md5
host    app,"my db"     app,"We ""Quote"""  10.0.0.0/8          scram-sha-256   # lists
host    app, reports    bob             192.168.1.7 255.255.255.0   password
hostssl all             all             ::1/128                 cert clientcert=verify-full
hostssl sameuser        all             2001:db8::/32           scram-sha-256 map="a b"
hostnossl all           eve             0.0.0.0/0               reject
host    all             all             all                     md5
'''


def _rules() -> list[HbaRule]:
    return parse_hba(FILE, "pg_hba.conf")


def _match(
    conn_type: str = "host",
    *,
    ssl: bool = False,
    database: str = "app",
    user: str = "app",
    address: str | None = "127.0.0.1",
    rules: list[HbaRule] | None = None,
) -> HbaRule | None:
    return match_hba(
        _rules() if rules is None else rules,
        conn_type=conn_type,
        ssl=ssl,
        database=database,
        user=user,
        address=address,
    )


# -- parsing ---------------------------------------------------------------------------


def test_realistic_file_parses_to_rules() -> None:
    rules = _rules()
    assert [rule.line for rule in rules] == [4, 5, 8, 9, 10, 11, 12, 13, 14]
    assert rules[0] == HbaRule(4, "local", ("all",), ("postgres",), None, "trust", ())
    assert rules[1].method == "scram-sha-256"
    assert rules[2].databases == ('"all"',)
    assert rules[2].network == ipaddress.ip_network("127.0.0.1/32")
    assert rules[3].databases == ("app", "my db")
    assert rules[3].users == ("app", 'We "Quote"')
    assert rules[3].network == ipaddress.ip_network("10.0.0.0/8")
    assert rules[4].databases == ("app", "reports")
    assert rules[4].network == ipaddress.ip_network("192.168.1.0/24")
    assert rules[4].method == "password"
    assert rules[5].conn_type == "hostssl"
    assert rules[5].network == ipaddress.ip_network("::1/128")
    assert rules[5].options == (("clientcert", "verify-full"),)
    assert rules[6].databases == ("sameuser",)
    assert rules[6].options == (("map", "a b"),)
    assert rules[7].conn_type == "hostnossl"
    assert rules[7].method == "reject"
    assert rules[8].network is None


def test_empty_and_comment_only_files() -> None:
    assert parse_hba("") == []
    assert parse_hba("\n   \n# only a comment\n\t# another\n") == []


def test_quoted_keywords_are_names() -> None:
    (rule,) = parse_hba('local "all","sameuser",all,sameuser "all",all trust')
    assert rule.databases == ('"all"', '"sameuser"', "all", "sameuser")
    assert rule.users == ('"all"', "all")
    # "sameuser" is a keyword only in the database field.
    (rule,) = parse_hba('local all sameuser,"sameuser" trust')
    assert rule.users == ("sameuser", "sameuser")


def test_names_starting_with_a_quote_stay_unambiguous() -> None:
    # The database whose name is "all" with the quotes, written """all""".
    (rule,) = parse_hba('local """all""" all trust')
    assert rule.databases == ('"""all"""',)
    assert _match("local", database='"all"', address=None, rules=[rule]) is rule
    assert _match("local", database="all", address=None, rules=[rule]) is None


def test_quoted_prefixes_are_plain_names() -> None:
    (rule,) = parse_hba('local "@list" "+group","@x" trust')
    assert rule.databases == ("@list",)
    assert rule.users == ("+group", "@x")


def test_tokenizer_follows_postgres() -> None:
    # Quotes may cover part of a token; a lone "@" is a name; commas may be followed by
    # blanks inside a field; empty list items vanish; "#" inside quotes is literal.
    (rule,) = parse_hba('local a"b c"d,  @,,e "x#y",z trust#comment')
    assert rule.databases == ("ab cd", "@", "e")
    assert rule.users == ("x#y", "z")
    assert rule.method == "trust"


def test_a_comma_after_blanks_starts_a_new_field() -> None:
    # "app ,other": the blank ends the field, so "other" is the user and "bob" the method.
    with pytest.raises(HbaError, match='invalid authentication method "bob"'):
        parse_hba("local app ,other bob trust")


def test_crlf_line_endings() -> None:
    rules = parse_hba("local all all trust\r\nhost all all ::/0 md5\r\n")
    assert [(r.line, r.method) for r in rules] == [(1, "trust"), (2, "md5")]


def test_backslash_continuation() -> None:
    text = "# head\nhost all \\\n  all \\\n  10.1.2.3/8 \\\n  md5\nlocal all all trust\n"
    first, second = parse_hba(text)
    assert first.line == 2  # a record is numbered by its first line
    assert first.network == ipaddress.ip_network("10.0.0.0/8")
    assert first.method == "md5"
    assert second.line == 6


def test_backslash_continuation_edge_cases() -> None:
    # A comment ending in a backslash swallows the next line (PostgreSQL joins first).
    assert parse_hba("# comment \\\nlocal all all trust\n") == []
    # A continuation into an empty line ends there.
    (rule,) = parse_hba("local all all trust \\\n\nlocal all all reject\n")[:1]
    assert rule.method == "trust"
    assert [r.line for r in parse_hba("local all all trust \\\n\nlocal all all reject")] == [1, 3]
    # A trailing backslash on the last line is dropped.
    assert parse_hba("local all all trust\\")[0].method == "trust"


def test_addresses() -> None:
    def network(address: str) -> object:
        (rule,) = parse_hba(f"host all all {address} md5")
        return rule.network

    assert network("0.0.0.0/0") == ipaddress.ip_network("0.0.0.0/0")
    assert network("::/0") == ipaddress.ip_network("::/0")
    assert network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")  # host bits ignored
    assert network("fe80::1/64") == ipaddress.ip_network("fe80::/64")
    assert network("192.0.2.5 255.255.255.255") == ipaddress.ip_network("192.0.2.5/32")
    assert network("10.9.8.7 255.0.0.0") == ipaddress.ip_network("10.0.0.0/8")
    assert network("2001:db8::1 ffff:ffff::") == ipaddress.ip_network("2001:db8::/32")
    assert network("10.0.0.0 0.0.0.0") == ipaddress.ip_network("0.0.0.0/0")
    assert network("all") is None


def test_options_keep_order_and_values() -> None:
    (rule,) = parse_hba('hostssl all all all cert clientcert=verify-full map=m,x=1 "y=a b" z=')
    assert rule.options == (
        ("clientcert", "verify-full"),
        ("map", "m"),
        ("x", "1"),
        ("y", "a b"),
        ("z", ""),
    )
    (rule,) = parse_hba("local all all md5 opt=a=b")
    assert rule.options == (("opt", "a=b"),)


def test_source_names_the_file() -> None:
    with pytest.raises(HbaError) as info:
        parse_hba("local all all trust\n\nlocal all all ident\n", "/etc/pgmux/hba.conf")
    assert str(info.value).startswith("/etc/pgmux/hba.conf line 3: ")
    assert info.value.source == "/etc/pgmux/hba.conf"
    assert info.value.line == 3
    assert isinstance(info.value, ValueError)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # connection types
        ("hostgssenc all all all md5", 'unsupported connection type "hostgssenc"'),
        ("hostnogssenc all all all md5", 'unsupported connection type "hostnogssenc"'),
        ("hots all all all md5", 'invalid connection type "hots" (pgmux supports local, host,'),
        ("local,host all all trust", "multiple values specified for connection type"),
        ("include other.conf", 'unsupported directive "include"'),
        ("include_if_exists other.conf", 'unsupported directive "include_if_exists"'),
        ("include_dir conf.d", 'unsupported directive "include_dir"'),
        # missing fields
        ("local", "end-of-line before database specification"),
        ("local all", "end-of-line before role specification"),
        ("local all all", "end-of-line before authentication method"),
        ("host all all", "end-of-line before IP address specification"),
        ("host all all 10.0.0.0/8", "end-of-line before authentication method"),
        ("host all all 10.0.0.1", "end-of-line before netmask specification"),
        # databases and users
        ("local replication all trust", 'unsupported database "replication"'),
        ("local app,replication all trust", 'unsupported database "replication"'),
        ("local samerole all trust", 'unsupported database "samerole"'),
        ("local samegroup all trust", 'unsupported database "samegroup"'),
        ("local @dbs.txt all trust", 'unsupported database "@dbs.txt"'),
        ("local /^app all trust", 'unsupported database "/^app"'),
        ('local "/^app" all trust', 'unsupported database "/^app"'),
        ("local all +admins trust", 'unsupported user "+admins"'),
        ("local all @users.txt trust", 'unsupported user "@users.txt"'),
        ("local all /^a trust", 'unsupported user "/^a"'),
        # addresses
        (
            "host all all samenet md5",
            'line 1: unsupported address "samenet" (pgmux supports CIDR, IP + netmask, or all)',
        ),
        ("host all all samehost md5", 'unsupported address "samehost"'),
        ("host all all db.example.com md5", 'unsupported address "db.example.com"'),
        ("host all all .example.com md5", 'unsupported address ".example.com"'),
        ("host all all localhost md5", 'unsupported address "localhost"'),
        ('host all all "all" md5', 'unsupported address "all" (quoted, so a host name'),
        ("host all all example.com/24 md5", 'invalid IP address "example.com/24"'),
        ("host all all 10.0.0.0/33 md5", 'invalid CIDR mask in address "10.0.0.0/33"'),
        ("host all all ::/129 md5", 'invalid CIDR mask in address "::/129"'),
        ("host all all 10.0.0.0/ md5", 'invalid CIDR mask in address "10.0.0.0/"'),
        ("host all all 10.0.0.0/255.0.0.0 md5", "invalid CIDR mask in address"),
        ("host all all 10.0.0.0/-1 md5", "invalid CIDR mask in address"),
        ("host all all fe80::1%eth0/64 md5", "does not match IPv6 zones"),
        ("host all all 10.0.0.0/8,::1/128 md5", "multiple values specified for host address"),
        ("host all all 10.0.0.1 255.0.0.0,255.0.0.0 md5", "multiple values specified for netmask"),
        ("host all all 10.0.0.1 md5", 'invalid IP mask "md5"'),
        ("host all all 10.0.0.1 ffff:: md5", "IP address and mask do not match"),
        ("host all all 10.0.0.1 255.0.255.0 md5", 'unsupported netmask "255.0.255.0"'),
        # methods
        ("local all all peer", 'unsupported authentication method "peer" (pgmux supports'),
        (
            "host all all all ident",
            'unsupported authentication method "ident" '
            "(pgmux supports trust, reject, md5, password, scram-sha-256, cert)",
        ),
        ("host all all all gss", 'unsupported authentication method "gss"'),
        ("host all all all ldap ldapserver=x", 'unsupported authentication method "ldap"'),
        ("host all all all radius", 'unsupported authentication method "radius"'),
        ("host all all all pam", 'unsupported authentication method "pam"'),
        ("host all all all sspi", 'unsupported authentication method "sspi"'),
        ("host all all all MD5", 'invalid authentication method "MD5"'),
        ("host all all all scram", 'invalid authentication method "scram"'),
        ("host all all all md5,trust", "multiple values specified for authentication type"),
        ("host all all all cert", "cert authentication is only supported on hostssl"),
        ("local all all cert", "cert authentication is only supported on hostssl"),
        # options
        ("local all all md5 clientcert", "authentication option 1 is not in name=value format"),
        ("local all all md5 a=1 b", "authentication option 2 is not in name=value format"),
        ("local all all md5 =x", "authentication option 1 is not in name=value format"),
        # quoting
        ('local "app all trust', "unterminated quoted string"),
        ('local all "a""" trust x="', "unterminated quoted string"),
    ],
)
def test_errors(line: str, message: str) -> None:
    with pytest.raises(HbaError) as info:
        parse_hba("# first line\n" + line + "\n", "hba")
    assert str(info.value).startswith("hba line 2: ")
    assert message.removeprefix("line 1: ") in str(info.value)


def test_error_line_in_realistic_file() -> None:
    with pytest.raises(HbaError, match=r'^hba line 15: unsupported user "\+admins"'):
        parse_hba(FILE + "local all +admins trust\n")


def test_option_error_does_not_echo_the_token() -> None:
    # Option values can be secrets; a token missing "=" might be half of one.
    with pytest.raises(HbaError) as info:
        parse_hba('local all all md5 "ldapbindpasswd s3cret"')
    assert "s3cret" not in str(info.value)


# -- matching --------------------------------------------------------------------------


def test_local_matches_only_local_rules() -> None:
    rule = _match("local", user="postgres", address=None)
    assert rule is not None and rule.line == 4
    rule = _match("local", user="app", address=None)
    assert rule is not None and rule.line == 5
    # A local rule never matches TCP: postgres over TCP falls through to the last rule.
    rule = _match("host", user="postgres", database="postgres", address="127.0.0.1")
    assert rule is not None and rule.line == 14
    # Local ignores ssl and address.
    rule = _match("local", ssl=True, user="postgres", address="10.0.0.1")
    assert rule is not None and rule.line == 4


def test_first_match_wins() -> None:
    rules = parse_hba(
        "host all all 10.0.0.0/8 reject\nhost all all 10.1.0.0/16 trust\nhost all all all md5\n"
    )
    assert _match(address="10.1.2.3", rules=rules) is rules[0]
    assert _match(address="11.1.2.3", rules=rules) is rules[2]
    reordered = [rules[1], rules[0], rules[2]]
    assert _match(address="10.1.2.3", rules=reordered) is rules[1]


def test_quoted_all_database_is_a_name() -> None:
    rule = _match(database="all", address="127.0.0.1")
    assert rule is not None and rule.line == 8
    # database "app" from 127.0.0.1 skips line 8 and lands on the catch-all.
    rule = _match(database="app", address="127.0.0.1")
    assert rule is not None and rule.line == 14


def test_database_and_user_lists() -> None:
    rule = _match(database="my db", user='We "Quote"', address="10.200.0.1")
    assert rule is not None and rule.line == 9
    rule = _match(database="reports", user="bob", address="192.168.1.200")
    assert rule is not None and rule.method == "password"
    # Outside the netmask: the catch-all.
    rule = _match(database="reports", user="bob", address="192.168.2.1")
    assert rule is not None and rule.line == 14


def test_names_are_case_sensitive() -> None:
    rules = parse_hba("local App all trust\nlocal all Bob trust\n")
    assert _match("local", database="app", user="x", address=None, rules=rules) is None
    assert _match("local", database="App", user="x", address=None, rules=rules) is rules[0]
    assert _match("local", database="d", user="bob", address=None, rules=rules) is None
    assert _match("local", database="d", user="Bob", address=None, rules=rules) is rules[1]
    # Unquoted keywords are case-sensitive too: ALL is a name.
    (rule,) = parse_hba("local ALL ALL trust")
    assert rule.databases == ("ALL",)
    assert _match("local", database="app", user="app", address=None, rules=[rule]) is None


def test_sameuser() -> None:
    rules = parse_hba("host sameuser all all trust\nhost all all all reject\n")
    assert _match(database="alice", user="alice", rules=rules) is rules[0]
    assert _match(database="alice", user="bob", rules=rules) is rules[1]
    # A quoted "sameuser" is the database called sameuser.
    rules = parse_hba('host "sameuser" all all trust')
    assert _match(database="bob", user="bob", rules=rules) is None
    assert _match(database="sameuser", user="bob", rules=rules) is rules[0]


def test_quoted_all_user_is_a_name() -> None:
    rules = parse_hba('local all "all" trust')
    assert _match("local", user="app", address=None, rules=rules) is None
    assert _match("local", user="all", address=None, rules=rules) is rules[0]


def test_tls_connection_types() -> None:
    rules = parse_hba(
        "hostssl all all all scram-sha-256\nhostnossl all all all reject\nhost all all all md5\n"
    )
    assert _match(ssl=True, rules=rules) is rules[0]
    assert _match(ssl=False, rules=rules) is rules[1]
    host_only = [rules[2]]
    assert _match(ssl=True, rules=host_only) is rules[2]
    assert _match(ssl=False, rules=host_only) is rules[2]
    assert _match("local", address=None, rules=rules) is None


def test_realistic_tls_rules() -> None:
    rule = _match(ssl=True, database="x", user="carol", address="::1")
    assert rule is not None and rule.method == "cert"
    rule = _match(ssl=True, database="carol", user="carol", address="2001:db8:1::5")
    assert rule is not None and rule.line == 12
    rule = _match(ssl=False, database="carol", user="carol", address="2001:db8:1::5")
    assert rule is not None and rule.line == 14
    rule = _match(ssl=False, user="eve", address="203.0.113.9")
    assert rule is not None and rule.method == "reject"
    rule = _match(ssl=True, user="eve", address="203.0.113.9")
    assert rule is not None and rule.method == "md5"


def test_ipv4_and_ipv6() -> None:
    rules = parse_hba("host all all 10.0.0.0/8 trust\nhost all all ::/0 md5\n")
    assert _match(address="10.2.3.4", rules=rules) is rules[0]
    assert _match(address="11.2.3.4", rules=rules) is None  # ::/0 is IPv6 only
    assert _match(address="2001:db8::1", rules=rules) is rules[1]
    assert _match(address="::1", rules=rules) is rules[1]


def test_ipv4_mapped_ipv6_matches_as_ipv4() -> None:
    rules = parse_hba("host all all 10.0.0.0/8 trust\nhost all all ::/0 md5\n")
    assert _match(address="::ffff:10.1.2.3", rules=rules) is rules[0]
    assert _match(address="::ffff:a01:203", rules=rules) is rules[0]
    # A mapped address outside the IPv4 rule is an IPv4 client, so ::/0 does not match.
    assert _match(address="::ffff:11.1.2.3", rules=rules) is None
    exact = parse_hba("host all all 127.0.0.1 255.255.255.255 trust")
    assert _match(address="::ffff:127.0.0.1", rules=exact) is exact[0]


def test_address_all_matches_any_tcp_address() -> None:
    rules = parse_hba("host all all all trust")
    for address in ("127.0.0.1", "::1", "::ffff:1.2.3.4", "fe80::1%eth0"):
        assert _match(address=address, rules=rules) is rules[0]


def test_no_rules_no_match() -> None:
    assert _match(rules=[]) is None
    assert _match("local", address=None, rules=[]) is None


def test_match_argument_errors() -> None:
    with pytest.raises(ValueError, match="conn_type"):
        _match("hostssl")
    with pytest.raises(ValueError, match="address"):
        _match("host", address=None)
    with pytest.raises(ValueError):
        _match("host", address="not-an-ip")


# -- messages --------------------------------------------------------------------------


def test_describe_no_match_host() -> None:
    assert describe_no_match("host", False, "app", "app", "127.0.0.1") == (
        'no pg_hba.conf entry for host "127.0.0.1", user "app", database "app", no encryption'
    )
    assert describe_no_match("host", True, "db", "u", "::1") == (
        'no pg_hba.conf entry for host "::1", user "u", database "db", SSL encryption'
    )


def test_describe_no_match_local() -> None:
    # PostgreSQL prints a unix-socket peer as [local] (psql: FATAL:  no pg_hba.conf entry
    # for host "[local]", user "app", database "app", no encryption).
    assert describe_no_match("local", False, "app", "app", None) == (
        'no pg_hba.conf entry for host "[local]", user "app", database "app", no encryption'
    )
    assert describe_no_match("local", True, "app", "app", None).endswith("no encryption")


def test_describe_reject() -> None:
    assert describe_reject("host", True, "app", "eve", "10.0.0.5") == (
        'pg_hba.conf rejects connection for host "10.0.0.5", user "eve", database "app", '
        "SSL encryption"
    )


def test_describe_argument_errors() -> None:
    with pytest.raises(ValueError):
        describe_no_match("hostnossl", False, "a", "b", "127.0.0.1")
    with pytest.raises(ValueError):
        describe_no_match("host", False, "a", "b", None)
