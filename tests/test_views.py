"""The pages: sign-up, log in/out, lobby, room, through Django's test client."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from chat import presence
from chat.models import Room

pytestmark = pytest.mark.django_db

PASSWORD = "a-Secret-pass-42"  # the conftest's make_user password
LOBBY = "/chat/"
LOGIN = "/accounts/login/"
LOGOUT = "/accounts/logout/"
SIGNUP = "/accounts/signup/"
ROOM_NAME_ERROR = "Use 1-64 lower-case letters"


@pytest.fixture
def signed_in(client, alice) -> Client:
    client.force_login(alice)
    return client


def signed_in_user_id(client: Client) -> int | None:
    value = client.session.get("_auth_user_id")
    return None if value is None else int(value)


def assert_redirects_to(response, url: str) -> None:
    assert response.status_code == 302, response.status_code
    assert response["Location"] == url


def online_counts(html: str) -> dict[str, int]:
    """Returns {room: online} from the lobby's table rows."""
    rows = re.findall(
        r'<tr data-room="([^"]+)">.*?<td class="online">(\d+)</td>', html, re.S
    )
    return {slug: int(online) for slug, online in rows}


def room_slugs() -> set[str]:
    return set(Room.objects.values_list("slug", flat=True))


# ---------------------------------------------------------------------------
# Accounts
# ---------------------------------------------------------------------------


def test_signup_page_shows_the_form(client):
    response = client.get(SIGNUP)
    assert response.status_code == 200
    assert 'name="password2"' in response.content.decode()


def test_signup_creates_a_user_and_signs_them_in(client):
    response = client.post(SIGNUP, signup_data())
    assert_redirects_to(response, LOBBY)
    user = get_user_model().objects.get(username="carol")
    assert user.check_password(PASSWORD)
    assert signed_in_user_id(client) == user.pk


def signup_data(**fields: str) -> dict[str, str]:
    return {"username": "carol", "password1": PASSWORD, "password2": PASSWORD, **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"password2": "other-42-X"}, "password2"),
        ({"password1": "123", "password2": "123"}, "password2"),
        ({"username": ""}, "username"),
        ({"username": "alice"}, "username"),
        ({"username": "bad name!"}, "username"),
    ],
)
def test_bad_signup_is_400_with_form_errors_and_creates_nobody(
    client, alice, fields, field
):
    users_before = get_user_model().objects.count()
    response = client.post(SIGNUP, signup_data(**fields))
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert 'class="errorlist' in response.content.decode()
    assert get_user_model().objects.count() == users_before
    assert signed_in_user_id(client) is None


def test_signup_when_signed_in_goes_to_the_lobby(signed_in):
    assert_redirects_to(signed_in.get(SIGNUP), LOBBY)


def test_login_signs_in_and_goes_to_the_lobby(client, alice):
    response = client.post(LOGIN, {"username": "alice", "password": PASSWORD})
    assert_redirects_to(response, LOBBY)
    assert signed_in_user_id(client) == alice.pk


def test_login_with_a_wrong_password_stays_on_the_form(client, alice):
    response = client.post(LOGIN, {"username": "alice", "password": "wrong"})
    assert response.status_code == 200
    assert response.context["form"].errors
    assert signed_in_user_id(client) is None


def test_logout_is_a_post_that_signs_out(signed_in):
    assert signed_in.get(LOGOUT).status_code == 405
    assert signed_in_user_id(signed_in) is not None
    assert_redirects_to(signed_in.post(LOGOUT), LOGIN)
    assert signed_in_user_id(signed_in) is None
    assert_redirects_to(signed_in.get(LOBBY), f"{LOGIN}?next={LOBBY}")


# ---------------------------------------------------------------------------
# Lobby
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [LOBBY, "/chat/lobby/", "/chat/missing/"])
def test_chat_pages_require_login(client, room, path):
    assert_redirects_to(client.get(path), f"{LOGIN}?next={path}")


def test_post_to_the_lobby_requires_login_and_creates_nothing(client):
    assert_redirects_to(client.post(LOBBY, {"name": "new"}), f"{LOGIN}?next={LOBBY}")
    assert "new" not in room_slugs()


def test_site_root_redirects_to_the_lobby(client):
    assert_redirects_to(client.get("/"), LOBBY)


def test_lobby_lists_rooms_with_distinct_online_users(signed_in, room, alice, bob):
    Room.objects.create(slug="empty")
    for user, channel in ((alice, "a1"), (alice, "a2"), (bob, "b1")):
        presence.connection_open(
            room=room, user=user, channel_name=channel, max_per_user=20
        )
    response = signed_in.get(LOBBY)
    assert response.status_code == 200
    counts = online_counts(response.content.decode())
    assert (counts["lobby"], counts["empty"]) == (2, 0)
    assert 'href="/chat/empty/"' in response.content.decode()


def test_lobby_form_enters_an_existing_room(signed_in, room):
    assert_redirects_to(signed_in.post(LOBBY, {"name": "lobby"}), "/chat/lobby/")
    assert Room.objects.filter(slug="lobby").count() == 1


def test_lobby_form_creates_a_new_room_normalising_the_name(signed_in):
    assert_redirects_to(
        signed_in.post(LOBBY, {"name": "  New-Room "}), "/chat/new-room/"
    )
    assert "new-room" in room_slugs()


@pytest.mark.parametrize("name", ["Bad Name", "", "-dash", "_under", "a" * 65, "café"])
def test_lobby_form_with_an_invalid_name_is_400_and_creates_nothing(signed_in, name):
    before = room_slugs()
    response = signed_in.post(LOBBY, {"name": name})
    assert response.status_code == 400
    assert 'role="alert"' in response.content.decode()
    assert response.context["form"].errors["name"]
    assert room_slugs() == before


def test_lobby_form_explains_the_room_name_rules(signed_in):
    response = signed_in.post(LOBBY, {"name": "Bad Name"})
    assert ROOM_NAME_ERROR in response.content.decode()


def test_lobby_post_without_csrf_token_is_forbidden(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(LOBBY, {"name": "csrf-room"}).status_code == 403
    assert "csrf-room" not in room_slugs()
    client.get(LOBBY)  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    response = client.post(LOBBY, {"name": "csrf-room", "csrfmiddlewaretoken": token})
    assert_redirects_to(response, "/chat/csrf-room/")


# ---------------------------------------------------------------------------
# Room page
# ---------------------------------------------------------------------------


def test_room_page_mounts_the_chat_client(signed_in, room):
    response = signed_in.get("/chat/lobby/")
    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-room="lobby"' in html
    assert 'data-user="alice"' in html
    assert '<script type="module" src="/static/chat/room.js"></script>' in html


def test_missing_room_with_a_valid_name_offers_to_create_it(signed_in):
    response = signed_in.get("/chat/fresh/")
    html = response.content.decode()
    assert response.status_code == 404
    assert '<form method="post" action="/chat/">' in html
    assert '<input type="hidden" name="name" value="fresh">' in html
    assert "csrfmiddlewaretoken" in html
    assert "fresh" not in room_slugs()


@pytest.mark.parametrize(
    "path", ["/chat/Bad%20Name/", "/chat/UPPER/", "/chat/room%0A/", "/chat/-x/"]
)
def test_room_page_with_an_invalid_name_is_a_plain_404(signed_in, path):
    before = room_slugs()
    response = signed_in.get(path)
    html = response.content.decode()
    assert response.status_code == 404
    assert "Not found" in html
    assert "does not exist yet" not in html
    assert room_slugs() == before


def test_room_page_is_get_only(signed_in, room):
    assert signed_in.post("/chat/lobby/").status_code == 405


# ---------------------------------------------------------------------------
# The lobby's live room list (JSON)
# ---------------------------------------------------------------------------

ROOMS_JSON = "/chat/rooms.json"


def test_room_list_json_is_for_signed_in_users_only(client):
    response = client.get(ROOMS_JSON)
    assert response.status_code == 401
    assert response.json() == {"detail": "not signed in"}


def test_room_list_json_has_online_users_and_last_activity(signed_in, room, alice, bob):
    for user, channel in ((alice, "a1"), (alice, "a2"), (bob, "b1")):
        presence.connection_open(
            room=room, user=user, channel_name=channel, max_per_user=20
        )
    response = signed_in.get(ROOMS_JSON)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    rooms = {entry["room"]: entry for entry in response.json()["rooms"]}
    lobby = rooms["lobby"]
    assert (lobby["url"], lobby["online"]) == ("/chat/lobby/", 2)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lobby["last_activity"]
    )


def test_room_page_passes_the_message_limit_to_the_script(signed_in, room, settings):
    settings.CHAT_MAX_MESSAGE_LENGTH = 123
    assert 'data-max-length="123"' in signed_in.get("/chat/lobby/").content.decode()
