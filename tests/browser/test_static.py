"""A worker with DEBUG off and no nginx in front serves its pages' static files."""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

from playwright.sync_api import Response

from tests.browser.conftest import SERVER_ENV, new_account, new_room, open_room

# collectstatic's name for a file: its name and 12 hex digits of its content's hash.
HASHED = re.compile(r"^/static/chat/[a-z_]+\.[0-9a-f]{12}\.(css|js)$")
YEAR = 365 * 24 * 3600


def max_age(cache_control: str) -> int:
    found = re.search(r"max-age=(\d+)", cache_control)
    return int(found.group(1)) if found else 0


def test_a_worker_with_debug_off_serves_the_pages_css_and_javascript(
    browsing, daphne_factory
):
    secret = secrets.token_urlsafe(50)
    server = daphne_factory(
        {**SERVER_ENV, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secret}
    )
    alice = new_account(server.base_url, "alice")
    room = new_room(server, alice)
    context = browsing.context(server, alice)
    static: dict[str, Response] = {}

    def keep(response: Response) -> None:
        path = urlsplit(response.url).path
        if path.startswith("/static/"):
            static.setdefault(path, response)

    context.on("response", keep)

    # The socket opens: the page's JavaScript was served and ran.
    page = open_room(browsing, server, alice, room, context=context)

    failed = {path: r.status for path, r in static.items() if r.status != 200}
    assert not failed, failed
    # The page names its files by their hashed names, each cached for good.
    css = page.locator('link[rel="stylesheet"]').get_attribute("href")
    script = page.locator('script[type="module"]').get_attribute("src")
    for path in (css, script):
        assert HASHED.match(path), f"{path} has no content hash in its name"
        cache = static[path].headers.get("cache-control", "")
        assert max_age(cache) >= YEAR and "immutable" in cache, f"{path}: {cache}"
    # So does every module the page's script imports, itself and through
    # others: a new release cannot mix with a cached old module.
    modules = [path for path in static if path.endswith(".js") and path != script]
    assert modules, "the page's script imported no module"
    unhashed = [path for path in modules if not HASHED.match(path)]
    assert not unhashed, f"imported by their plain names: {unhashed}"
    for path in modules:
        cache = static[path].headers.get("cache-control", "")
        assert max_age(cache) >= YEAR and "immutable" in cache, f"{path}: {cache}"

    # The stylesheet applied: its rules are there, and body has chat.css's
    # margin, not the browser's 8px.
    rules = page.evaluate(
        """href => Array.from(document.styleSheets)
            .filter(sheet => sheet.href && new URL(sheet.href).pathname === href)
            .reduce((count, sheet) => count + sheet.cssRules.length, 0)""",
        css,
    )
    assert rules > 0, f"{css} applied no rules"
    assert page.evaluate("getComputedStyle(document.body).marginTop") == "0px"
