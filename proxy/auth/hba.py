"""pg_hba.conf for pgmux's auth_type = "hba": the subset pgmux can honour, parsed and matched.

Syntax and matching follow the PostgreSQL docs ("The pg_hba.conf File") and
src/backend/libpq/hba.c. Anything pgmux cannot evaluate (host names, samehost/samenet,
+group, regular expressions, @file and include directives, methods other than those in
`METHODS`) raises `HbaError` when the file is read, so no rule is silently skipped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# "local" is pgmux's own unix socket; there is no GSSAPI encryption, so no hostgssenc.
CONN_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "md5", "password", "scram-sha-256", "cert")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The keywords each field gives a meaning to when written unquoted (the PostgreSQL docs:
# "Quoting one of the keywords in a database, user, or address field ... makes the word
# lose its special meaning, and just match a database, user, or host with that name").
_DATABASE_KEYWORDS = frozenset({"all", "sameuser"})
_USER_KEYWORDS = frozenset({"all"})

# The other methods PostgreSQL knows (client-auth docs, "Authentication Methods"), so
# that a copied pg_hba.conf gets "unsupported" rather than "invalid" for them.
_POSTGRES_ONLY_METHODS = frozenset(
    {"ident", "peer", "gss", "sspi", "pam", "bsd", "ldap", "radius", "oauth"}
)
_INCLUDE_DIRECTIVES = frozenset({"include", "include_if_exists", "include_dir"})

# pg_isblank() in hba.c: the only characters that separate fields.
_BLANK = " \t\r"

_SUPPORTED_CONN_TYPES = ", ".join(CONN_TYPES)
_SUPPORTED_METHODS = ", ".join(METHODS)
_SUPPORTED_ADDRESSES = "pgmux supports CIDR, IP + netmask, or all"


class HbaError(ValueError):
    """A pg_hba.conf line pgmux cannot read; the message names the file and the line."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source} line {line}: {message}")
        self.source = source
        self.line = line


# Builds the HbaError for the line being parsed, given just the message.
_Fail = Callable[[str], HbaError]


@dataclass(frozen=True, slots=True)
class HbaRule:
    """One pg_hba.conf record.

    `databases` and `users` hold the keywords ("all"; "sameuser" for databases) as the
    bare words and names as themselves. A quoted name that would otherwise read as a
    keyword, or that starts with a double quote, is stored in PostgreSQL's quoted form
    (`'"all"'`; `""` for each embedded quote): an entry starting with `"` is always a
    name, so the quoted name all and the keyword all never collide. `network` is None
    for "local" rules and for the address "all". `options` keeps the `name=value`
    options after the method, in file order, for the caller to enforce.
    """

    line: int
    conn_type: str
    databases: tuple[str, ...]
    users: tuple[str, ...]
    network: IPNetwork | None
    method: str
    options: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    quoted: bool


# -- reading the file ------------------------------------------------------------------


def parse_hba(text: str, source: str = "hba") -> list[HbaRule]:
    """Parse pg_hba.conf `text`; `source` (usually the file name) prefixes error messages."""
    rules: list[HbaRule] = []
    for number, line in _logical_lines(text):
        fields = _split_fields(line, source, number)
        if fields:
            rules.append(_parse_record(fields, source, number))
    return rules


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) per record, joining backslash continuations.

    PostgreSQL 16+ (tokenize_auth_file()): a backslash that is the last character of a
    line joins the next line; it is checked before comments are stripped, and a
    record's line number is that of its first line.
    """
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        first = index + 1
        buf = ""
        # hba.c remembers where the last continuation ended so that a line "\" followed
        # by an empty line does not continue twice.
        last_join = 0
        while index < len(lines):
            buf += lines[index].rstrip("\r\n")
            index += 1
            if len(buf) > last_join and buf.endswith("\\"):
                buf = buf[:-1]
                last_join = len(buf)
                continue
            break
        yield first, buf


def _split_fields(line: str, source: str, number: int) -> list[list[_Token]]:
    """Split a record into fields, each a list of comma-separated tokens (next_field_expand)."""
    fields: list[list[_Token]] = []
    pos = 0
    while pos < len(line):
        field: list[_Token] = []
        while True:
            token, pos, comma = _next_token(line, pos, source, number)
            if token is None:
                break
            field.append(token)
            if not comma:
                break
        if field:
            fields.append(field)
    return fields


def _next_token(line: str, pos: int, source: str, number: int) -> tuple[_Token | None, int, bool]:
    """One token from `pos`: (token or None at end of line, next position, ended by comma).

    A port of next_token() in hba.c: blanks and commas separate tokens outside double
    quotes, `#` outside quotes starts a comment, `""` inside quotes is a literal quote,
    and quotes may cover part of a token. A token counts as quoted when it begins with
    a quote (that is what stops keywords and the + and @ prefixes from applying).
    """
    end = len(line)
    while pos < end and (line[pos] in _BLANK or line[pos] == ","):
        pos += 1
    chars: list[str] = []
    in_quote = was_quote = saw_quote = initial_quote = comma = False
    while pos < end and (in_quote or line[pos] not in _BLANK):
        c = line[pos]
        if c == "#" and not in_quote:
            pos = end
            break
        if c == "," and not in_quote:
            comma = True
            pos += 1
            break
        if c != '"' or was_quote:
            chars.append(c)
        was_quote = (not was_quote) if (in_quote and c == '"') else False
        if c == '"':
            in_quote = not in_quote
            saw_quote = True
            if not chars:
                initial_quote = True
        pos += 1
    if in_quote:
        # PostgreSQL takes the rest of the line as the token; refuse it instead.
        raise HbaError(source, number, "unterminated quoted string")
    if not chars and not saw_quote:
        return None, pos, False
    return _Token("".join(chars), initial_quote), pos, comma


def _parse_record(fields: list[list[_Token]], source: str, number: int) -> HbaRule:
    """Turn one tokenized record into a rule (parse_hba_line() in hba.c)."""

    def fail(message: str) -> HbaError:
        return HbaError(source, number, message)

    def single(index: int, what: str, missing: str) -> _Token:
        if index >= len(fields):
            raise fail(f"end-of-line before {missing}")
        if len(fields[index]) > 1:
            raise fail(f"multiple values specified for {what}")
        return fields[index][0]

    conn_type = single(0, "connection type", "connection type").text
    if conn_type in _INCLUDE_DIRECTIVES:
        raise fail(f'unsupported directive "{conn_type}" (pgmux reads a single file)')
    if conn_type not in CONN_TYPES:
        kind = "unsupported" if conn_type in ("hostgssenc", "hostnogssenc") else "invalid"
        raise fail(f'{kind} connection type "{conn_type}" (pgmux supports {_SUPPORTED_CONN_TYPES})')

    if len(fields) < 2:
        raise fail("end-of-line before database specification")
    databases = tuple(_database_entry(token, fail) for token in fields[1])
    if len(fields) < 3:
        raise fail("end-of-line before role specification")
    users = tuple(_user_entry(token, fail) for token in fields[2])

    index = 3
    network: IPNetwork | None = None
    if conn_type != "local":
        address = single(index, "host address", "IP address specification")
        index += 1
        network, needs_mask = _parse_address(address, fail)
        if needs_mask:
            mask = single(index, "netmask", "netmask specification (or write CIDR: a.b.c.d/n)")
            index += 1
            network = _apply_netmask(address.text, mask.text, fail)

    method = single(index, "authentication type", "authentication method").text
    index += 1
    if method not in METHODS:
        kind = "unsupported" if method in _POSTGRES_ONLY_METHODS else "invalid"
        raise fail(f'{kind} authentication method "{method}" (pgmux supports {_SUPPORTED_METHODS})')
    if method == "cert" and conn_type != "hostssl":
        # PostgreSQL refuses the same line: a client certificate needs TLS.
        raise fail("cert authentication is only supported on hostssl connections")

    options: list[tuple[str, str]] = []
    for field in fields[index:]:
        for token in field:
            name, sep, value = token.text.partition("=")
            if not sep or not name:
                # The token is not repeated: option values can be secrets (ldapbindpasswd).
                raise fail(f"authentication option {len(options) + 1} is not in name=value format")
            options.append((name, value))

    return HbaRule(number, conn_type, databases, users, network, method, tuple(options))


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _name_entry(token: _Token, keywords: frozenset[str]) -> str:
    if token.quoted and (token.text in keywords or token.text.startswith('"')):
        return _quote_name(token.text)
    return token.text


def _database_entry(token: _Token, fail: _Fail) -> str:
    text = token.text
    if text.startswith("/"):
        # PostgreSQL 16+ compiles a leading slash as a regular expression, quoted or not.
        raise fail(f'unsupported database "{text}": pgmux does not match regular expressions')
    if not token.quoted:
        if len(text) > 1 and text.startswith("@"):
            raise fail(f'unsupported database "{text}": pgmux does not read @ files')
        if text == "replication":
            raise fail('unsupported database "replication": pgmux does not pool replication')
        if text in ("samerole", "samegroup"):
            raise fail(f'unsupported database "{text}": pgmux does not check role membership')
    return _name_entry(token, _DATABASE_KEYWORDS)


def _user_entry(token: _Token, fail: _Fail) -> str:
    text = token.text
    if text.startswith("/"):
        raise fail(f'unsupported user "{text}": pgmux does not match regular expressions')
    if not token.quoted:
        if text.startswith("+"):
            raise fail(f'unsupported user "{text}": pgmux does not check role membership')
        if len(text) > 1 and text.startswith("@"):
            raise fail(f'unsupported user "{text}": pgmux does not read @ files')
    return _name_entry(token, _USER_KEYWORDS)


def _parse_address(token: _Token, fail: _Fail) -> tuple[IPNetwork | None, bool]:
    """(network, whether a netmask field follows) for the address field."""
    text = token.text
    if not token.quoted and text == "all":
        return None, False
    if not token.quoted and text in ("samehost", "samenet"):
        raise fail(f'unsupported address "{text}" ({_SUPPORTED_ADDRESSES})')
    host, slash, bits = text.partition("/")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Not numeric: PostgreSQL would take it as a host name to resolve.
        hint = "quoted, so a host name; " if token.quoted else ""
        kind = "invalid IP address" if slash else "unsupported address"
        raise fail(f'{kind} "{text}" ({hint}{_SUPPORTED_ADDRESSES})') from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise fail(f'unsupported address "{text}": pgmux does not match IPv6 zones')
    if not slash:
        return None, True
    # pg_sockaddr_cidr_mask(): a decimal bit count no longer than the address.
    if not (bits.isascii() and bits.isdigit()) or int(bits) > address.max_prefixlen:
        raise fail(f'invalid CIDR mask in address "{text}"')
    # Host bits set below the mask are ignored, as PostgreSQL compares under the mask.
    return ipaddress.ip_network((address, int(bits)), strict=False), False


def _apply_netmask(address_text: str, mask_text: str, fail: _Fail) -> IPNetwork:
    address = ipaddress.ip_address(address_text)
    try:
        mask = ipaddress.ip_address(mask_text)
    except ValueError:
        raise fail(
            f'invalid IP mask "{mask_text}" (an address without /bits needs a netmask field)'
        ) from None
    if mask.version != address.version:
        raise fail("IP address and mask do not match")
    inverted = int(mask) ^ ((1 << mask.max_prefixlen) - 1)
    if inverted & (inverted + 1):
        # PostgreSQL applies any bit pattern; an ip_network needs contiguous ones.
        raise fail(f'unsupported netmask "{mask_text}": pgmux supports contiguous netmasks only')
    prefix = mask.max_prefixlen - inverted.bit_length()
    return ipaddress.ip_network((address, prefix), strict=False)


# -- matching a connection -------------------------------------------------------------


def match_hba(
    rules: Sequence[HbaRule],
    *,
    conn_type: str,
    ssl: bool,
    database: str,
    user: str,
    address: str | None,
) -> HbaRule | None:
    """The first rule matching a connection, or None ("no pg_hba.conf entry").

    `conn_type` is "local" (pgmux's unix socket; `ssl` and `address` are ignored) or
    "host" (TCP; `address` is the client's IP as text, `ssl` whether TLS is in use).
    Names compare exactly, as PostgreSQL compares the names given at startup. An
    IPv4-mapped IPv6 address (::ffff:a.b.c.d) matches as the IPv4 address it carries.
    """
    client = _client_address(conn_type, address)
    for rule in rules:
        if not _conn_type_matches(rule.conn_type, conn_type, ssl):
            continue
        if client is not None and rule.network is not None and client not in rule.network:
            continue
        if _database_matches(rule.databases, database, user) and _user_matches(rule.users, user):
            return rule
    return None


def describe_no_match(
    conn_type: str, ssl: bool, database: str, user: str, address: str | None
) -> str:
    """PostgreSQL's message when no rule matches (auth.c, uaImplicitReject; SQLSTATE 28000)."""
    return "no pg_hba.conf entry for " + _describe(conn_type, ssl, database, user, address)


def describe_reject(
    conn_type: str, ssl: bool, database: str, user: str, address: str | None
) -> str:
    """PostgreSQL's message when the matching rule says "reject" (auth.c, uaReject; 28000)."""
    return "pg_hba.conf rejects connection for " + _describe(
        conn_type, ssl, database, user, address
    )


def _describe(conn_type: str, ssl: bool, database: str, user: str, address: str | None) -> str:
    _client_address(conn_type, address)
    # A unix socket's peer prints as "[local]" (getnameinfo_unix() in src/common/ip.c);
    # PostgreSQL 14+ ends with the encryption state.
    host = "[local]" if conn_type == "local" else address
    encryption = "SSL encryption" if ssl and conn_type == "host" else "no encryption"
    return f'host "{host}", user "{user}", database "{database}", {encryption}'


def _client_address(
    conn_type: str, address: str | None
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if conn_type == "local":
        return None
    if conn_type != "host":
        raise ValueError(f'conn_type must be "local" or "host", not {conn_type!r}')
    if address is None:
        raise ValueError("a TCP connection needs the client's address")
    client = ipaddress.ip_address(address)
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d. PostgreSQL's
        # IPv6 sockets are IPV6_V6ONLY, so it only ever sees such a client as IPv4:
        # match it that way, against IPv4 rules only.
        return client.ipv4_mapped
    return client


def _conn_type_matches(rule_type: str, conn_type: str, ssl: bool) -> bool:
    if conn_type == "local":
        return rule_type == "local"
    if rule_type == "host":
        return True
    if rule_type == "hostssl":
        return ssl
    if rule_type == "hostnossl":
        return not ssl
    return False


def _unquote_name(entry: str) -> str:
    if entry.startswith('"'):
        return entry[1:-1].replace('""', '"')
    return entry


def _database_matches(entries: tuple[str, ...], database: str, user: str) -> bool:
    for entry in entries:
        if entry == "all":
            return True
        if entry == "sameuser":
            if database == user:
                return True
        elif _unquote_name(entry) == database:
            return True
    return False


def _user_matches(entries: tuple[str, ...], user: str) -> bool:
    return any(entry == "all" or _unquote_name(entry) == user for entry in entries)
