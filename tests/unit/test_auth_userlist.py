"""PgBouncer's auth_file format (userlist.txt) and classifying the secrets in it."""

import pytest

from proxy.auth import ScramSecret, UserlistError, md5_secret, parse_userlist, secret_kind

# pg_authid.rolpassword as PostgreSQL 15 stored it for CREATE ROLE app PASSWORD 'secret'.
SCRAM = (
    "SCRAM-SHA-256$4096:fwLhcurHrglfweTroa+2pA==$"
    "sfcA1HRmJg/t+4oVMtFqIry3XEtcjgJzDpm9KiJNqvA=:"
    "7PaWEf/3fT1unLRj9SLcd8T99Vrn216yDlPJ7vRBft8="
)
MD5 = "md51df59ed3db2d942a46e855424bbafc45"  # md5user / md5secret


def test_pgbouncer_doc_example() -> None:
    # PgBouncer docs, "Authentication file format" (the <...> placeholders filled in).
    text = (
        '"username1" "password" ...\n'
        '"username2" "md5abcdef012342345abcdef012342345"\n'
        f'"username2" "{SCRAM}"\n'
    )
    assert parse_userlist(text) == {"username1": "password", "username2": SCRAM}


def test_secrets_are_kept_verbatim() -> None:
    text = f'"app" "{SCRAM}"\n"md5user" "{MD5}"\n"plain" "  spaced  pass  "\n"empty" ""\n'
    assert parse_userlist(text) == {
        "app": SCRAM,
        "md5user": MD5,
        "plain": "  spaced  pass  ",
        "empty": "",
    }


def test_doubled_quotes_are_literal_quotes() -> None:
    text = '"we ""quote""" "pa""ss"\n"""" """"""\n'
    assert parse_userlist(text) == {'we "quote"': 'pa"ss', '"': '""'}


def test_comments_and_blank_lines_are_skipped() -> None:
    text = (
        "; PgBouncer's documented comment\n"
        '# a hash comment "x" "y"\n'
        "\n"
        "   \t\n"
        'plain text line "u" "p"\n'
        '"app" "secret"\n'
    )
    assert parse_userlist(text) == {"app": "secret"}


def test_leading_blanks_and_crlf() -> None:
    text = '  \t"app" "secret"\r\n"bob"\t"pw"\r\n'
    assert parse_userlist(text) == {"app": "secret", "bob": "pw"}


def test_fields_after_the_password_are_ignored() -> None:
    text = '"app" "secret" "extra" unquoted ; whatever\n"bob" "pw"x\n'
    assert parse_userlist(text) == {"app": "secret", "bob": "pw"}


def test_later_duplicates_win() -> None:
    text = '"app" "first"\n"bob" "b"\n"app" "second"\n'
    assert parse_userlist(text) == {"app": "second", "bob": "b"}


def test_non_ascii_and_special_characters() -> None:
    text = '"jürgen" "pässwörd #;,\\\\"\n'
    assert parse_userlist(text) == {"jürgen": "pässwörd #;,\\\\"}


def test_empty_file() -> None:
    assert parse_userlist("") == {}
    assert parse_userlist("\n\n; nothing\n") == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('"app', "unterminated quoted user name"),
        ('"app""', "unterminated quoted user name"),
        # "" is a literal quote, so the user name is 'app" ' and the password unquoted.
        ('"app"" "secret"', "expected the password in double quotes after the user name"),
        ('"app"', "expected the password in double quotes after the user name"),
        ('"app"   ', "expected the password in double quotes after the user name"),
        ('"app" secret', "expected the password in double quotes after the user name"),
        ('"app" x "secret"', "expected the password in double quotes after the user name"),
        ('"app" "secret', "unterminated quoted password"),
        ('"app" "sec""', "unterminated quoted password"),
    ],
)
def test_malformed_lines(line: str, message: str) -> None:
    text = '; users\n"ok" "fine"\n' + line + "\n"
    with pytest.raises(UserlistError) as info:
        parse_userlist(text, "/etc/pgmux/userlist.txt")
    assert str(info.value) == f"/etc/pgmux/userlist.txt line 3: {message}"
    assert info.value.source == "/etc/pgmux/userlist.txt"
    assert info.value.line == 3
    assert isinstance(info.value, ValueError)


def test_default_source_name() -> None:
    with pytest.raises(UserlistError, match=r"^auth_file line 1: "):
        parse_userlist('"app" "unterminated')


def test_errors_never_contain_the_secret() -> None:
    with pytest.raises(UserlistError) as info:
        parse_userlist('"app" "hunter2')
    assert "hunter2" not in str(info.value)


# -- secret kinds ----------------------------------------------------------------------


def test_secret_kinds() -> None:
    assert secret_kind(SCRAM) == "scram"
    assert secret_kind(ScramSecret.from_password("pw", salt=b"s" * 16).to_string()) == "scram"
    assert secret_kind(MD5) == "md5"
    assert secret_kind(md5_secret("u", "p")) == "md5"
    assert secret_kind("hunter2") == "plain"
    assert secret_kind("") == "plain"


@pytest.mark.parametrize(
    "secret",
    [
        "SCRAM-SHA-256$",  # the prefix alone
        "SCRAM-SHA-256$4096:c2FsdA==$bad:bad",  # keys not base64 of 32 bytes
        "SCRAM-SHA-256$0:" + SCRAM.split(":", 1)[1],  # zero iterations
        "scram-sha-256" + SCRAM[len("SCRAM-SHA-256") :],  # wrong case
        "md5" + "0" * 31,  # one digit short
        "md5" + "A" * 32,  # uppercase hex
        "MD5" + MD5[3:],
        MD5 + "0",
    ],
)
def test_look_alikes_are_plain(secret: str) -> None:
    # PostgreSQL's get_password_type(): what does not parse is a plaintext password.
    assert secret_kind(secret) == "plain"
