"""PgBouncer's auth_file ("userlist.txt"): user names and their secrets, read unchanged.

The format (PgBouncer docs, "Authentication file format"; load_auth_file() in
src/loader.c): one user per line, `"username" "password"`, both fields in double
quotes, a double quote inside a field written as two; anything after the second field
is ignored. The password is a plaintext password, an MD5 secret (`md5` + 32 hex digits)
or a SCRAM secret (`SCRAM-SHA-256$...`), kept verbatim.
"""

from .md5 import is_md5_secret
from .scram import ScramSecret

# C isspace(), which PgBouncer uses to skip blank space before and between the fields.
_SPACE = " \t\v\f\r"


class UserlistError(ValueError):
    """A malformed auth_file line. The message names the file and line, never the secret."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source} line {line}: {message}")
        self.source = source
        self.line = line


def parse_userlist(text: str, source: str = "auth_file") -> dict[str, str]:
    """Map each user in auth_file `text` to its secret; `source` prefixes error messages.

    Blank lines and lines whose first non-blank character is not `"` are skipped as
    comments (PgBouncer documents `;`; `#` is common too). A line that starts with `"`
    but is malformed raises UserlistError. A user listed twice gets the later secret,
    as PgBouncer's add_user() overwrites the earlier password.

    PgBouncer itself stops reading at the first line that starts with anything but
    `"` or `;`, and skips any characters between the two fields; pgmux skips such
    lines and allows only blanks between the fields.
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.lstrip(_SPACE)
        if not line.startswith('"'):
            continue
        user, pos = _quoted_field(line, 0, source, number, "user name")
        while pos < len(line) and line[pos] in _SPACE:
            pos += 1
        if pos == len(line) or line[pos] != '"':
            raise UserlistError(
                source, number, "expected the password in double quotes after the user name"
            )
        password, _ = _quoted_field(line, pos, source, number, "password")
        users[user] = password
    return users


def _quoted_field(line: str, start: int, source: str, number: int, what: str) -> tuple[str, int]:
    """The field whose opening quote is at `start`, and the position after its closing quote."""
    chars: list[str] = []
    pos = start + 1
    while pos < len(line):
        c = line[pos]
        if c == '"':
            if line.startswith('"', pos + 1):
                # Two double quotes are one literal quote (find_quote() in loader.c).
                chars.append('"')
                pos += 2
                continue
            return "".join(chars), pos + 1
        chars.append(c)
        pos += 1
    raise UserlistError(source, number, f"unterminated quoted {what}")


def secret_kind(secret: str) -> str:
    """Classify an auth_file secret as "scram", "md5" or "plain" (a plaintext password).

    The same test PostgreSQL's get_password_type() and PgBouncer apply: a string that
    parses as a SCRAM-SHA-256 secret is one, `md5` + 32 lowercase hex digits is an MD5
    secret, and anything else (including a malformed SCRAM secret) is a plaintext password.
    """
    if ScramSecret.is_scram_secret(secret):
        return "scram"
    if is_md5_secret(secret):
        return "md5"
    return "plain"
