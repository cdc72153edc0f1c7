"""Rules the code of chat/ and chatproject/ must keep, read from its syntax tree
(no server, no DB): SQL goes through the ORM or parameters, never through text
built from values.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("chat", "chatproject")

# Manager.raw() and QuerySet.extra() take SQL text; RawSQL is SQL text.
RAW_SQL_METHODS = {"raw", "extra"}
RAW_SQL_NAMES = {"RawSQL"}
EXECUTE_METHODS = {"execute", "executemany", "executescript"}


def _is_built_text(node: ast.expr) -> bool:
    """True for text made from values: an f-string, `%`, `+` or `.format()`."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    )


def sql_offences(source: str, filename: str = "<source>") -> list[str]:
    """Returns `file:line: what` for each raw or text-built SQL in `source`."""
    offences = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in RAW_SQL_METHODS:
                offences.append(f"{where}: .{method}() takes SQL text")
            elif method in EXECUTE_METHODS and node.args:
                if _is_built_text(node.args[0]):
                    offences.append(
                        f"{where}: .{method}() with SQL built from values "
                        "(pass them as parameters)"
                    )
        elif isinstance(node, ast.Name) and node.id in RAW_SQL_NAMES:
            offences.append(f"{where}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in RAW_SQL_NAMES:
            offences.append(f"{where}: {node.attr}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in RAW_SQL_NAMES:
            offences.append(f"{where}: imports {node.name}")
    return offences


def checked_files() -> list[Path]:
    return sorted(
        path for folder in CHECKED for path in (REPO_ROOT / folder).rglob("*.py")
    )


def test_no_raw_or_text_built_sql_in_the_code():
    assert checked_files(), "no source files found"
    offences = [
        offence
        for path in checked_files()
        for offence in sql_offences(path.read_text(), str(path.relative_to(REPO_ROOT)))
    ]
    assert offences == []


@pytest.mark.parametrize(
    "source",
    [
        "Message.objects.raw('SELECT * FROM chat_message')",
        "Room.objects.extra(where=['slug = 1'])",
        "from django.db.models.expressions import RawSQL",
        "Room.objects.annotate(x=expressions.RawSQL('1', []))",
        "cursor.execute(f'SELECT * FROM chat_room WHERE slug = {slug}')",
        "cursor.execute('SELECT * FROM chat_room WHERE slug = %s' % slug)",
        "cursor.execute('SELECT * FROM chat_room WHERE slug = ' + slug)",
        "cursor.execute('SELECT * FROM chat_room WHERE slug = {}'.format(slug))",
        "connection.cursor().executemany(f'DELETE FROM {table}', rows)",
    ],
)
def test_the_rule_catches_raw_sql(source):
    assert sql_offences(source), source


@pytest.mark.parametrize(
    "source",
    [
        "cursor.execute('SELECT 1')",
        "cursor.execute('SELECT * FROM chat_room WHERE slug = %s', [slug])",
        "cursor.execute(f'SELECT 1')",
        "await pipe.execute()",
        "Room.objects.filter(slug=slug)",
    ],
)
def test_the_rule_lets_parameterised_sql_through(source):
    assert sql_offences(source) == [], source
