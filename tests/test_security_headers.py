"""Headers on every answer (CSP, nosniff, referrers, framing), no inline script
in the templates, and the deploy checks with the production switches on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatproject.security import POLICY

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((ROOT / "templates").rglob("*.html"))

PAGES = [
    "/chat/",
    "/chat/lobby/",
    "/accounts/login/",
    "/accounts/signup/",
    "/admin/",
    "/admin/chat/room/",
    "/api/rooms/",
    "/healthz",
    "/no-such-page/",
]


def directives(header: str) -> dict[str, str]:
    parts = (part.strip().split(" ", 1) for part in header.split(";") if part.strip())
    return {part[0]: part[1] if len(part) > 1 else "" for part in parts}


@pytest.mark.parametrize("path", PAGES)
def test_every_answer_has_the_security_headers(admin_client, room, path):
    response = admin_client.get(path)
    policy = directives(response["Content-Security-Policy"])
    assert policy["script-src"] == "'self'", path
    assert policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    if response["Content-Type"].startswith("text/html"):
        assert response["X-Frame-Options"] == "DENY"


def test_only_the_admin_allows_inline_styles(admin_client, room):
    page = directives(admin_client.get("/chat/lobby/")["Content-Security-Policy"])
    admin = directives(admin_client.get("/admin/")["Content-Security-Policy"])
    assert page["style-src"] == "'self'"
    assert admin["style-src"] == "'self' 'unsafe-inline'"
    assert page == directives(POLICY)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.name)
def test_templates_have_no_inline_script_or_style(template):
    html = template.read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, f"inline script in {template.name}: {tag}"
    assert not re.search(r"<style\b", html), template.name
    assert not re.search(r"\sstyle=", html), template.name
    assert not re.search(r"\son[a-z]+=", html), template.name


def deploy_check(**env: str) -> subprocess.CompletedProcess:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "CHAT_"))
    }
    environment.update(
        {
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "k" * 10 + "-a-long-random-production-secret-" * 2,
            "DJANGO_ALLOWED_HOSTS": "chat.example.com",
            **env,
        }
    )
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_deploy_checks_pass_with_https_switched_on():
    result = deploy_check(DJANGO_HTTPS="1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_checks_name_what_is_missing_without_it():
    result = deploy_check()
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stdout + result.stderr, check
