"""docs/protocol.md stays true to chat/protocol.py."""

from pathlib import Path

import pytest

from chat import protocol

PROTOCOL_DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def constants(prefix: str) -> list[tuple[str, object]]:
    return [(name, value) for name, value in vars(protocol).items() if name.startswith(prefix)]


@pytest.mark.parametrize("name,code", constants("ERROR_"))
def test_every_error_code_is_documented(name, code):
    assert f"| `{code}` |" in PROTOCOL_DOC, f"{name} = {code!r} is missing from the doc"


@pytest.mark.parametrize("name,code", constants("CLOSE_"))
def test_every_close_code_is_documented(name, code):
    assert f"| `{code}` |" in PROTOCOL_DOC, f"{name} = {code!r} is missing from the doc"


def test_the_doc_lists_no_error_code_the_code_lacks():
    import re

    section = PROTOCOL_DOC.split("### Error codes", 1)[1].split("## Close codes", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert documented == {code for _, code in constants("ERROR_")}
