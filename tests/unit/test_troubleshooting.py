"""docs/troubleshooting.md against the code, collected from the source with ``ast``:

- every ``reason`` pgmux can put on an error (the ``reason`` class attribute of every
  ProxyError subclass anywhere in proxy/, and every ``reason=`` keyword of any call)
  is documented, and the document names no reason the code does not have;
- every SQLSTATE pgmux sends itself (``sqlstate`` class attributes, ``sqlstate=``
  keywords, the code of an ErrorResponse it builds, the ``"C"``/``"sqlstate"`` of an
  error dict) is documented;
- every message and log line the document quotes (``**Message:**`` and ``**Log:**``
  lines, ``<...>`` and ``…`` standing for variable text) is one the code can produce:
  it matches a string literal, f-string or %-format string in proxy/, whose
  interpolations match anything.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "troubleshooting.md"
# The reference renderers hold descriptions, not errors pgmux makes.
DOC_MODULES = {"config_schema.py", "metrics_doc.py"}
SOURCES = sorted(p for p in (ROOT / "proxy").rglob("*.py") if p.name not in DOC_MODULES)

SQLSTATE = re.compile(r"[0-9A-Z]{5}")
NOT_ERRORS = {"00000", "01000"}  # NOTICE and WARNING codes the console uses
HOLE = "\x00"  # an interpolation in a code template; a <placeholder> in a quoted text
ELLIPSIS = "\x01"  # … in a quoted text: anything, fixed words included
PERCENT = re.compile(r"%(?:\.\d+)?[sdrgf]")
PLACEHOLDER = re.compile(r"<[^<>`]+>")
MIN_LITERAL = 6  # letters and digits a code template needs to vouch for a quote
QUOTED_LINE = re.compile(r"^\s*(?:- )?\*\*(Message|Log):\*\*(.*)$")
CODE_SPAN = re.compile(r"`([^`]+)`")


def _trees() -> Iterator[tuple[Path, ast.Module]]:
    for path in SOURCES:
        yield path, ast.parse(path.read_text(), str(path))


def _base_names(node: ast.ClassDef) -> set[str]:
    names = set()
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.add(base.id)
        elif isinstance(base, ast.Attribute):
            names.add(base.attr)
    return names


def _class_constants(node: ast.ClassDef, name: str) -> list[str]:
    """``name = "..."`` (or annotated) in the class body."""
    found = []
    for stmt in node.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        named = any(isinstance(t, ast.Name) and t.id == name for t in targets)
        if named and isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.append(value.value)
    return found


def _strings(node: ast.AST) -> list[str]:
    """Every string constant in an expression (a literal, or a default as in
    ``fields.get("C", "08001")`` or either arm of a conditional)."""
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _proxy_error_classes(trees: list[tuple[Path, ast.Module]]) -> list[ast.ClassDef]:
    """ProxyError and its subclasses, wherever in proxy/ they are defined."""
    classes = [n for _, tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    family = {"ProxyError"}
    grew = True
    while grew:
        grew = False
        for cls in classes:
            if cls.name not in family and _base_names(cls) & family:
                family.add(cls.name)
                grew = True
    return [cls for cls in classes if cls.name in family]


@functools.cache
def collected() -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """(reason -> where, SQLSTATE -> where, problems) from every file under proxy/."""
    trees = list(_trees())
    reasons: dict[str, list[str]] = {}
    codes: dict[str, list[str]] = {}
    problems: list[str] = []

    def add(table: dict[str, list[str]], value: str, path: Path, node: ast.AST) -> None:
        table.setdefault(value, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")  # type: ignore[attr-defined]

    for cls in _proxy_error_classes(trees):
        path = next(p for p, tree in trees if cls in ast.walk(tree))
        for value in _class_constants(cls, "reason"):
            add(reasons, value, path, cls)
    for path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for value in _class_constants(node, "sqlstate"):
                    add(codes, value, path, node)
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "reason":
                        values = _strings(keyword.value)
                        no_reason = isinstance(keyword.value, ast.Constant) and (
                            keyword.value.value is None
                        )
                        if not values and not no_reason:
                            problems.append(
                                f"{path.relative_to(ROOT)}:{node.lineno}: reason= is not a "
                                "string literal, so it cannot be checked against the doc"
                            )
                        for value in values:
                            add(reasons, value, path, node)
                    elif keyword.arg == "sqlstate":
                        for value in _strings(keyword.value):
                            add(codes, value, path, node)
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "error_response" and len(node.args) >= 2:
                    severity, code = node.args[0], node.args[1]
                    if isinstance(severity, ast.Constant) and severity.value in ("ERROR", "FATAL"):
                        for value in _strings(code):
                            add(codes, value, path, node)
                if name == "count_pooler_error" and node.args:
                    for value in _strings(node.args[0]):
                        add(reasons, value, path, node)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value in ("C", "sqlstate"):
                        for text in _strings(value):
                            add(codes, text, path, node)
    codes = {code: where for code, where in codes.items() if SQLSTATE.fullmatch(code)}
    for code in NOT_ERRORS:
        codes.pop(code, None)
    return reasons, codes, problems


def test_the_collection_finds_what_is_known() -> None:
    """Guards the collection itself: an empty result would make every check pass."""
    reasons, codes, problems = collected()
    assert not problems, "\n".join(problems)
    known = ("other", "max_client_conn", "query_wait_timeout", "admin_command",
             "cancelled_while_waiting", "statement_mode_transaction", "admin_kill")  # fmt: skip
    for reason in known:
        assert reason in reasons, reason
    for code in ("53300", "57014", "08P01", "28P01", "42P05", "25P03", "F0000", "08006"):
        assert code in codes, code
    assert len(reasons) >= 20 and len(codes) >= 18


# -- reasons and SQLSTATEs --------------------------------------------------------------------


def test_every_reason_is_documented() -> None:
    reasons, _, _ = collected()
    text = DOC.read_text()
    missing = {r: where for r, where in reasons.items() if f"`{r}`" not in text}
    assert not missing, "docs/troubleshooting.md lacks these reasons (as `reason`): " + "; ".join(
        f"{r} ({', '.join(where)})" for r, where in sorted(missing.items())
    )


def test_the_doc_names_only_real_reasons() -> None:
    """Every **reason:** the document gives is one the code has."""
    reasons, _, _ = collected()
    named = set()
    for line in DOC.read_text().splitlines():
        if line.lstrip("- ").startswith("**reason:**"):
            named |= set(CODE_SPAN.findall(line))
    assert named, "no **reason:** lines found"
    assert named <= set(reasons), f"not reasons pgmux has: {sorted(named - set(reasons))}"


def test_every_sqlstate_is_documented() -> None:
    _, codes, _ = collected()
    text = DOC.read_text()
    missing = {c: where for c, where in codes.items() if not re.search(rf"\b{c}\b", text)}
    assert not missing, "docs/troubleshooting.md lacks these SQLSTATEs: " + "; ".join(
        f"{c} ({', '.join(where)})" for c, where in sorted(missing.items())
    )
    classes = {code[:2] for code in codes}
    for cls in classes:  # the class table at the end (pgmux_errors_total's sqlstate_class)
        assert re.search(rf"^\| `{cls}` \|", text, re.M), f"class {cls} missing from the table"


# -- quoted messages and log lines ---------------------------------------------------------


def _template(node: ast.AST) -> str | None:
    """A string expression as text with HOLE for each interpolation, or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PERCENT.sub(HOLE, node.value)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                parts.append(value.value)
            else:
                parts.append(HOLE)
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else HOLE) + (right if right is not None else HOLE)
    return None


@functools.cache
def templates() -> tuple[str, ...]:
    found = set()
    for _, tree in _trees():
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            text = _template(node)
            # Enough fixed words to say something ("%s: %s" would match any quote).
            if text and sum(ch.isalnum() for ch in text) >= MIN_LITERAL:
                found.add(re.sub(f"{HOLE}+", HOLE, text))
    return tuple(sorted(found))


def _could_be(quoted: str, template: str) -> bool:
    """The quote is something the template can produce: the template's interpolations
    (HOLE) take any text, the quote's placeholders included; a placeholder must fall in
    an interpolation, except ELLIPSIS, which also stands for fixed text left out."""

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(quoted):
            return all(ch == HOLE for ch in template[j:])
        if j == len(template):
            return all(ch == ELLIPSIS for ch in quoted[i:])
        a, b = quoted[i], template[j]
        if a == ELLIPSIS and (match(i + 1, j) or match(i, j + 1)):
            return True
        if b == HOLE and (match(i, j + 1) or match(i + 1, j)):
            return True
        return a == b and a not in (HOLE, ELLIPSIS) and match(i + 1, j + 1)

    return match(0, 0)


def _quoted() -> list[tuple[int, str, str]]:
    """(line number, kind, text with placeholders as HOLE) of every code span in a
    **Message:** or **Log:** item (its first line and its indented continuation lines,
    up to a nested bullet)."""
    out: list[tuple[int, str, str]] = []
    if not DOC.is_file():
        return out  # test_messages_were_found says so
    item: tuple[int, str] | None = None
    for number, line in enumerate(DOC.read_text().splitlines(), 1):
        found = QUOTED_LINE.match(line)
        if found:
            item, text = (number, found.group(1)), found.group(2)
        elif item is not None and line[:1].isspace() and not line.lstrip().startswith("- "):
            text = line
        else:
            item = None
            continue
        for span in CODE_SPAN.findall(text):
            out.append((item[0], item[1], _pattern(span)))
    return out


def _pattern(quoted: str) -> str:
    return PLACEHOLDER.sub(HOLE, quoted).replace("…", ELLIPSIS)


def test_messages_were_found() -> None:
    quoted = _quoted()
    assert sum(kind == "Message" for _, kind, _ in quoted) >= 60
    assert sum(kind == "Log" for _, kind, _ in quoted) >= 15


@pytest.mark.parametrize(("number", "kind", "text"), _quoted())
def test_quoted_text_comes_from_the_code(number: int, kind: str, text: str) -> None:
    probes = [part[:8] for part in re.split(f"[{HOLE}{ELLIPSIS}]", text) if len(part) >= 8]
    likely = [t for t in templates() if any(p in t for p in probes)]
    if not any(_could_be(text, t) for t in likely) and not any(
        _could_be(text, t) for t in templates() if t not in likely
    ):
        shown = text.replace(HOLE, "<...>").replace(ELLIPSIS, "…")
        pytest.fail(
            f"docs/troubleshooting.md:{number}: no {kind.lower()} in proxy/ reads {shown!r}"
        )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_internal_links_lead_somewhere() -> None:
    text = DOC.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    broken = sorted(set(links) - anchors)
    assert not broken, f"links to no heading: {broken}"
