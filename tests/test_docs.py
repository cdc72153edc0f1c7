"""docs/protocol.md, docs/api.md, README and ARCHITECTURE.md stay true to the code."""

import re
from pathlib import Path

import pytest

from chat import api as chat_api
from chat import protocol
from tests.conftest import spec_operations

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_DOC = (REPO_ROOT / "docs" / "protocol.md").read_text()
API_DOC = (REPO_ROOT / "docs" / "api.md").read_text()
README = (REPO_ROOT / "README.md").read_text()
ARCHITECTURE = (REPO_ROOT / "ARCHITECTURE.md").read_text()


def constants(prefix: str) -> list[tuple[str, object]]:
    return [
        (name, value)
        for name, value in vars(protocol).items()
        if name.startswith(prefix)
    ]


@pytest.mark.parametrize("name,code", constants("ERROR_"))
def test_every_error_code_is_documented(name, code):
    assert f"| `{code}` |" in PROTOCOL_DOC, f"{name} = {code!r} is missing from the doc"


@pytest.mark.parametrize("name,code", constants("CLOSE_"))
def test_every_close_code_is_documented(name, code):
    assert f"| `{code}` |" in PROTOCOL_DOC, f"{name} = {code!r} is missing from the doc"


def test_the_doc_lists_no_error_code_the_code_lacks():
    section = PROTOCOL_DOC.split("### Error codes", 1)[1].split("## Close codes", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert documented == {code for _, code in constants("ERROR_")}


def server_events_section() -> str:
    return PROTOCOL_DOC.split("## Server to client", 1)[1].split("### Error codes", 1)[
        0
    ]


@pytest.mark.parametrize("kind", sorted(protocol.server_event_types()))
def test_every_server_event_type_is_documented(kind):
    row = f'| `{{"type":"{kind}"'
    assert row in server_events_section(), f"the {kind!r} event is missing from the doc"


def test_the_doc_lists_no_server_event_the_code_lacks():
    rows = re.findall(r'^\| `\{"type":"([a-z_]+)"', server_events_section(), re.M)
    assert set(rows) == set(protocol.server_event_types())


def client_frames_section() -> str:
    return PROTOCOL_DOC.split("## Client to server", 1)[1].split("## Server to", 1)[0]


@pytest.mark.parametrize("kind", sorted(protocol.CLIENT_FRAMES))
def test_every_client_frame_type_is_documented(kind):
    row = f'| `{{"type":"{kind}"'
    assert row in client_frames_section(), f"the {kind!r} frame is missing from the doc"


def test_the_doc_lists_no_client_frame_the_code_lacks():
    rows = re.findall(r'^\| `\{"type":"([a-z_]+)"', client_frames_section(), re.M)
    assert set(rows) == set(protocol.CLIENT_FRAMES)


# ---------------------------------------------------------------------------
# docs/api.md and the README
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(chat_api.ERROR_STATUS))
def test_every_error_code_is_in_the_api_doc(code):
    status = chat_api.ERROR_STATUS[code]
    assert f"| `{code}` | {status} |" in API_DOC, f"{code} ({status}) is not in api.md"


@pytest.mark.parametrize(("method", "path"), spec_operations())
def test_every_endpoint_has_a_curl_example(method, path):
    pattern = (
        re.escape(path)
        .replace(r"\{room\}", "[a-z0-9_-]+")
        .replace(r"\{username\}", "[A-Za-z0-9_.@+-]+")
    )
    curls = [line for line in API_DOC.splitlines() if line.startswith("curl ")]
    assert any(re.search(pattern, line) for line in curls), path
    if method == "post":
        assert any(re.search(pattern, line) and " -d " in line for line in curls)


def test_api_settings_are_in_the_readme(settings):
    for name in dir(settings):
        if name.startswith("CHAT_API_"):
            assert f"`{name}`" in README


def test_readme_has_a_one_line_curl_that_publishes():
    section = README.split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^curl .*-d .*/api/rooms/[a-z0-9_-]+/messages/", section, re.M)


# ---------------------------------------------------------------------------
# ARCHITECTURE.md
# ---------------------------------------------------------------------------


def architecture_paths() -> list[str]:
    """Returns the repository paths ARCHITECTURE.md names in backticks (`chat/hub.py`).

    A path has a slash and may hold a `*`; URLs (`/api/`), placeholders
    (`room.<slug>`) and the commands in fenced blocks are not paths.
    """
    text = re.sub(r"^```.*?^```", "", ARCHITECTURE, flags=re.M | re.S)
    return sorted(
        {
            name
            for name in re.findall(r"`([^`\s]+)`", text)
            if "/" in name
            and not name.startswith("/")
            and "<" not in name
            and ":" not in name
        }
    )


def test_architecture_names_the_modules():
    paths = architecture_paths()
    assert len(paths) >= 40, paths
    assert "chat/consumers.py" in paths and "chatproject/settings.py" in paths


@pytest.mark.parametrize("path", architecture_paths())
def test_every_path_in_architecture_exists(path):
    found = list(REPO_ROOT.glob(path)) if "*" in path else [REPO_ROOT / path]
    assert found and all(p.exists() for p in found), (
        f"ARCHITECTURE.md names {path}: no such file"
    )


# ---------------------------------------------------------------------------
# docs/security.md, docs/reliability.md
# ---------------------------------------------------------------------------

# docs/security.md and docs/reliability.md name the tests that prove them: each
# of those tests, and each test file named, must exist.
PROOF_DOCS = ("security.md", "reliability.md")
TEST_SOURCES = "\n".join(p.read_text() for p in (REPO_ROOT / "tests").rglob("*.py"))


def named_tests(doc: str) -> list[str]:
    text = (REPO_ROOT / "docs" / doc).read_text()
    # Test names, not the test files of paths (`tests/test_api.py`).
    return sorted(set(re.findall(r"(?<![/\w])(test_\w+)(?![\w.])", text)))


def named_test_files(doc: str) -> list[str]:
    text = (REPO_ROOT / "docs" / doc).read_text()
    return sorted(set(re.findall(r"`(tests/[\w/]+\.py)", text)))


@pytest.mark.parametrize(
    ("doc", "least"), [("security.md", 40), ("reliability.md", 20)]
)
def test_the_proof_docs_name_their_tests(doc, least):
    assert len(named_tests(doc)) >= least, named_tests(doc)


@pytest.mark.parametrize(
    ("doc", "name"), [(doc, name) for doc in PROOF_DOCS for name in named_tests(doc)]
)
def test_every_test_a_proof_doc_names_exists(doc, name):
    assert re.search(rf"def {name}\b", TEST_SOURCES), (
        f"docs/{doc} names {name}: no such test"
    )


@pytest.mark.parametrize(
    ("doc", "path"),
    [(doc, path) for doc in PROOF_DOCS for path in named_test_files(doc)],
)
def test_every_test_file_a_proof_doc_names_exists(doc, path):
    assert (REPO_ROOT / path).exists(), f"docs/{doc} names {path}"
