"""The admin: live inspection, and moderation that open sockets feel at once."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client as HttpClient
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import api as chat_api
from chat import moderation, presence, protocol, services, tokens
from chat.models import (
    ApiToken,
    Connection,
    Membership,
    Message,
    ModerationAction,
    Room,
    RoomBan,
    Worker,
)
from tests.conftest import LOBBY_MESSAGES, assert_error, assert_event, db, post
from tests.conftest import ROOMS as API_ROOMS

ROOMS = "/admin/chat/room/"
MESSAGES = "/admin/chat/message/"
SOCKETS = "/admin/chat/connection/"
BANS = "/admin/chat/roomban/"
TOKENS = "/admin/chat/apitoken/"


def open_socket(room: Room, user, channel: str, worker: str | None = None) -> None:
    if worker is None:
        presence.connection_open(
            room=room, user=user, channel_name=channel, max_per_user=20
        )
    else:
        presence.worker_heartbeat(worker_id=worker)
        Connection.objects.create(
            room=room,
            user=user,
            channel_name=channel,
            worker=worker,
            address="10.0.0.9",
        )


def staff_client(make_user, *permissions: str) -> HttpClient:
    """Returns a client signed in as a staff user holding exactly `permissions`."""
    user = make_user(f"staff{len(permissions)}", is_staff=True)
    for codename in permissions:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = HttpClient()
    client.force_login(user)
    return client


def action(client: HttpClient, url: str, name: str, objects) -> object:
    return client.post(
        url,
        {
            "action": name,
            "_selected_action": [obj.pk for obj in objects],
            "post": "yes",
        },
    )


def kinds() -> list[str]:
    return list(
        ModerationAction.objects.order_by("created_at").values_list("kind", flat=True)
    )


# ---------------------------------------------------------------------------
# Inspection (sync, test client)
# ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_room_list_counts_live_members_sockets_and_messages(
    admin_client, room, alice, bob
):
    open_socket(room, alice, "a1")
    open_socket(room, alice, "a2")
    open_socket(room, bob, "b1", worker="dead-worker")
    Worker.objects.filter(id="dead-worker").update(
        heartbeat_at=timezone.now() - timedelta(hours=1)
    )
    for text in ("one", "two"):
        services.message_post(room=room, user=alice, text=text)
    response = admin_client.get(ROOMS)
    row = response.context["cl"].result_list.get(pk=room.pk)
    assert (row.online_count, row.socket_count) == (1, 2), "bob's worker is dead"
    assert (row.message_count, row.recent_count) == (2, 2)
    assert response.status_code == 200


@pytest.mark.django_db
def test_worker_list_shows_each_lease_and_its_sockets(admin_client, room, alice, bob):
    open_socket(room, alice, "a1", worker="live-worker")
    open_socket(room, bob, "b1", worker="live-worker")
    open_socket(room, bob, "b2", worker="dead-worker")
    Worker.objects.filter(id="dead-worker").update(
        heartbeat_at=timezone.now() - timedelta(hours=1)
    )
    changelist = admin_client.get("/admin/chat/worker/").context["cl"]
    model_admin = changelist.model_admin
    shown = {
        worker.id: (model_admin.alive(worker), model_admin.sockets(worker))
        for worker in changelist.result_list
    }
    assert shown == {"live-worker": (True, 2), "dead-worker": (False, 1)}


@pytest.mark.django_db
def test_room_filters_open_closed_and_recent_activity(admin_client, room, alice):
    quiet = Room.objects.create(slug="quiet", is_closed=True)
    services.message_post(room=room, user=alice, text="hi")

    def slugs(query: str) -> list[str]:
        result = admin_client.get(ROOMS + query).context["cl"].result_list
        return sorted(r.slug for r in result)

    assert "quiet" in slugs("?is_closed__exact=1") and "lobby" not in slugs(
        "?is_closed__exact=1"
    )
    assert slugs("?active=hour") == ["lobby"]
    assert quiet.slug in slugs("")


@pytest.mark.django_db
def test_room_page_shows_who_is_online_where_and_recent_messages(
    admin_client, room, alice, bob
):
    open_socket(room, alice, "a1")
    open_socket(room, alice, "a2")
    open_socket(room, bob, "b1", worker="other-worker")
    services.message_post(room=room, user=bob, text="<b>bold?</b>")
    page = admin_client.get(f"{ROOMS}{room.pk}/change/").content.decode()
    assert "alice (2 sockets)" in page and "bob (1 socket)" in page
    assert presence.WORKER_ID in page and "other-worker" in page
    assert "10.0.0.9" in page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page, "message text is escaped"


@pytest.mark.django_db
def test_room_page_shows_each_members_read_position(
    admin_client, django_assert_max_num_queries, room, alice, bob, make_user
):
    from chat import reading

    for n in range(5):
        services.message_post(room=room, user=alice, text=f"hi {n}")
    reading.read_advance(room=room, user=bob, seq=2)
    reading.read_advance(room=room, user=alice, seq=5)
    page = admin_client.get(f"{ROOMS}{room.pk}/change/").content.decode()
    section = re.sub(r">\s+<", "><", page.split("read positions", 1)[1])
    rows = re.findall(
        r'>(\w+)</a></p></td><td class="field-read_seq"><p>(\d+)</p></td>'
        r'<td class="field-unread"><p>(\d+)</p></td>',
        re.sub(r"\s+(?=<)|(?<=>)\s+", "", section),
    )
    assert rows == [("alice", "5", "0"), ("bob", "2", "3")]
    # One member or twenty: no query per row.
    with CaptureQueriesContext(connection) as few:
        admin_client.get(f"{ROOMS}{room.pk}/change/")
    for n in range(20):
        reading.read_advance(room=room, user=make_user(f"reader{n}"), seq=1)
    with django_assert_max_num_queries(len(few)):
        admin_client.get(f"{ROOMS}{room.pk}/change/")


@pytest.mark.django_db
def test_messages_are_searchable_and_filterable_with_links(
    admin_client, room, alice, bob
):
    other = Room.objects.create(slug="other")
    services.message_post(room=room, user=alice, text="apples")
    services.message_post(room=other, user=bob, text="bananas")

    def bodies(query: str) -> list[str]:
        return [
            m.body for m in admin_client.get(MESSAGES + query).context["cl"].result_list
        ]

    assert bodies("?q=apples") == ["apples"]
    assert bodies("?q=bob") == ["bananas"]
    assert bodies(f"?room__id__exact={other.pk}") == ["bananas"]
    page = admin_client.get(MESSAGES).content.decode()
    assert f"/admin/chat/room/{room.pk}/change/" in page
    assert f"/admin/auth/user/{alice.pk}/change/" in page


@pytest.mark.django_db
def test_admin_refuses_non_staff(client, alice, room):
    client.force_login(alice)
    response = client.get(ROOMS)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db
def test_staff_without_permission_cannot_delete_or_ban(make_user, room, alice):
    message, _ = services.message_post(room=room, user=alice, text="keep me")
    viewer = staff_client(make_user, "view_message", "view_room", "view_connection")
    open_socket(room, alice, "a1")

    assert (
        viewer.post(f"{MESSAGES}{message.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    action(viewer, MESSAGES, "delete_selected", [message])
    assert viewer.get(f"{BANS}add/").status_code == 403
    action(viewer, SOCKETS, "ban_users", Connection.objects.all())
    action(viewer, ROOMS, "close_rooms", [room])
    message.refresh_from_db()
    room.refresh_from_db()
    assert message.deleted_at is None
    assert not RoomBan.objects.exists()
    assert room.is_closed is False
    assert kinds() == []


@pytest.mark.django_db
def test_staff_with_delete_permission_can_delete(make_user, room, alice):
    message, _ = services.message_post(room=room, user=alice, text="spam")
    moderator = staff_client(make_user, "view_message", "delete_message")
    moderator.post(f"{MESSAGES}{message.pk}/delete/", {"post": "yes"})
    message.refresh_from_db()
    assert message.deleted_at is not None


@pytest.mark.django_db
def test_admin_posts_need_a_csrf_token(admin_user, room):
    client = HttpClient(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = action(client, ROOMS, "close_rooms", [room])
    assert response.status_code == 403
    room.refresh_from_db()
    assert room.is_closed is False


@pytest.mark.django_db
def test_moderation_record_is_read_only(admin_client, room, alice):
    message, _ = services.message_post(room=room, user=alice, text="x")
    action(admin_client, MESSAGES, "delete_selected", [message])
    record = ModerationAction.objects.get()
    page = admin_client.get("/admin/chat/moderationaction/").content.decode()
    assert "delete message" in page and "admin" in page
    assert (
        admin_client.get(
            f"/admin/chat/moderationaction/{record.pk}/delete/"
        ).status_code
        == 403
    )


@pytest.mark.django_db
def test_records_the_chat_writes_cannot_be_added_or_edited(
    admin_client, admin_user, room, alice
):
    message, _ = services.message_post(room=room, user=alice, text="said")
    open_socket(room, alice, "a1", worker="w1")
    moderation.user_kick(room=room, user=alice, actor=admin_user, reason="spam")
    rows = {
        "moderationaction": (ModerationAction.objects.get(), {"kind": "ban"}),
        "message": (message, {"body": "rewritten"}),
        "connection": (Connection.objects.get(), {"address": "10.9.9.9"}),
        "worker": (Worker.objects.get(), {"slow_closes": "99"}),
    }
    for name, (row, edit) in rows.items():
        base = f"/admin/chat/{name}/"
        assert admin_client.get(f"{base}add/").status_code == 403, name
        assert admin_client.post(f"{base}add/", edit).status_code == 403, name
        # The page still shows the row, with nothing to save.
        page = admin_client.get(f"{base}{row.pk}/change/")
        assert page.status_code == 200, name
        assert 'name="_save"' not in page.content.decode(), name
        before = type(row).objects.values().get(pk=row.pk)
        assert admin_client.post(f"{base}{row.pk}/change/", edit).status_code == 403
        assert type(row).objects.values().get(pk=row.pk) == before, name
        assert 'href="' + f"{base}add/" not in admin_client.get(base).content.decode()


@pytest.mark.django_db
def test_editing_a_ban_in_the_admin_is_recorded_and_an_end_in_the_past_lifts_it(
    admin_client, admin_user, room, alice
):
    ban = moderation.user_ban(room=room, user=alice, actor=admin_user, reason="spam")
    change = f"{BANS}{ban.pk}/change/"
    later = timezone.now() + timedelta(days=2)
    response = admin_client.post(
        change,
        {
            "reason": "spam, twice",
            "expires_at_0": f"{later:%Y-%m-%d}",
            "expires_at_1": f"{later:%H:%M:%S}",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    ban.refresh_from_db()
    assert ban.reason == "spam, twice"
    assert moderation.banned_pairs([(room, alice)])
    earlier = timezone.now() - timedelta(minutes=5)
    admin_client.post(
        change,
        {
            "reason": "served",
            "expires_at_0": f"{earlier:%Y-%m-%d}",
            "expires_at_1": f"{earlier:%H:%M:%S}",
        },
    )
    assert not moderation.banned_pairs([(room, alice)])
    records = ModerationAction.objects.order_by("created_at", "pk")
    assert [(r.kind, r.actor_id, r.detail.split(":")[0]) for r in records] == [
        ("ban", admin_user.pk, "spam"),
        ("ban", admin_user.pk, "changed"),
        ("unban", admin_user.pk, "ended early"),
    ]


@pytest.mark.django_db
def test_admin_refuses_an_invalid_room_name(admin_client):
    response = admin_client.post(f"{ROOMS}add/", {"slug": "Upper"})
    assert response.status_code == 200 and "lower-case" in response.content.decode()
    assert not Room.objects.filter(slug="Upper").exists()


# ---------------------------------------------------------------------------
# Live effect on open sockets (both channel layers)
# ---------------------------------------------------------------------------

live = pytest.mark.django_db(transaction=True)


async def admin_post(admin_client, url: str, data: dict):
    return await db(admin_client.post, url, data)


@live
async def test_deleting_a_message_removes_it_from_every_open_page(
    connect, admin_client, alice, bob, room
):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.wait_presence(joins=("bob",))
    first = await post(a, "spam")
    await b.receive()
    kept = await post(a, "fine")
    await b.receive()

    await admin_post(
        admin_client,
        MESSAGES,
        {"action": "delete_selected", "_selected_action": [first["id"]], "post": "yes"},
    )
    for client in (a, b):
        assert_event(
            await client.receive(), "deleted", id=first["id"], seq=first["seq"]
        )
    _, welcome = await connect(bob)
    assert [m["id"] for m in welcome["messages"]] == [kept["id"]]
    assert await db(kinds) == ["delete_message"]


@live
async def test_single_delete_view_is_a_soft_delete_seen_live(
    connect, admin_client, alice, room
):
    a, _ = await connect(alice)
    sent = await post(a, "oops")
    await admin_post(admin_client, f"{MESSAGES}{sent['id']}/delete/", {"post": "yes"})
    assert_event(await a.receive(), "deleted", id=sent["id"])
    stored = await db(Message.objects.get, pk=sent["id"])
    assert stored.body == "oops" and stored.deleted_at is not None


@live
async def test_closing_a_room_makes_it_read_only_until_reopened(
    connect, admin_client, alice, room
):
    a, _ = await connect(alice)
    await admin_post(
        admin_client, ROOMS, {"action": "close_rooms", "_selected_action": [room.pk]}
    )
    assert_event(await a.receive(), "room", closed=True)
    await a.send({"type": "message", "message": "anyone?", "client_id": "c1"})
    error = await a.receive_type("error")
    assert (error["code"], error["ref"]) == (protocol.ERROR_ROOM_CLOSED, "c1")
    _, welcome = await connect(alice)
    assert welcome["closed"] is True

    await admin_post(
        admin_client, ROOMS, {"action": "reopen_rooms", "_selected_action": [room.pk]}
    )
    assert_event(await a.receive(), "room", closed=False)
    assert_event(await post(a, "back"), "message", seq=1)
    assert await db(kinds) == ["close_room", "reopen_room"]


@live
async def test_kick_closes_the_users_sockets_in_that_room_with_4403(
    connect, admin_client, alice, bob, room
):
    await db(Room.objects.create, slug="other")
    a, _ = await connect(alice)
    b1, _ = await connect(bob)
    b2, _ = await connect(bob)
    elsewhere, _ = await connect(bob, room="other")
    await a.wait_presence(joins=("bob",))
    sockets = await db(lambda: list(Connection.objects.filter(user=bob, room=room)))

    await admin_post(
        admin_client,
        SOCKETS,
        {"action": "kick_users", "_selected_action": [c.pk for c in sockets]},
    )
    assert await b1.receive_close() == protocol.CLOSE_FORBIDDEN
    assert await b2.receive_close() == protocol.CLOSE_FORBIDDEN
    assert await elsewhere.receive_nothing(), "a kick is for one room"
    await b1.close()
    await b2.close()
    await a.wait_presence(leaves=("bob",))
    assert await db(kinds) == ["kick"]
    _, welcome = await connect(bob)  # a kick is not a ban
    assert welcome["type"] == "welcome"


@live
async def test_ban_kicks_now_and_refuses_reconnects_until_lifted(
    connect, admin_client, admin_user, bob, room
):
    b, _ = await connect(bob)
    response = await admin_post(
        admin_client,
        f"{BANS}add/",
        {
            "room": room.pk,
            "user": bob.pk,
            "reason": "flooding",
            "expires_at_0": "",
            "expires_at_1": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert await b.receive_close() == protocol.CLOSE_FORBIDDEN

    refused = await connect(bob, welcome=False)
    assert await refused.receive_close() == protocol.CLOSE_FORBIDDEN
    ban = await db(RoomBan.objects.get)
    assert (ban.reason, ban.created_by_id) == ("flooding", admin_user.pk)

    await admin_post(admin_client, f"{BANS}{ban.pk}/delete/", {"post": "yes"})
    _, welcome = await connect(bob)
    assert welcome["user"] == "bob"
    assert await db(kinds) == ["ban", "unban"]


@live
async def test_an_expired_ban_lets_the_user_back(connect, admin_user, bob, room):
    from chat import moderation

    await db(
        moderation.user_ban,
        room=room,
        user=bob,
        actor=admin_user,
        reason="cool down",
        expires_at=timezone.now() - timedelta(seconds=1),
    )
    _, welcome = await connect(bob)
    assert welcome["user"] == "bob"


# ---------------------------------------------------------------------------
# API tokens
# ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_add_shows_the_raw_token_once(admin_client, alice, room, api):
    response = admin_client.post(
        TOKENS + "add/",
        {
            "name": "ci",
            "owner": alice.pk,
            "can_publish": "on",
            "push_to": "owner",
            "author_name": "",
        },
        follow=True,
    )
    assert response.status_code == 200
    token = ApiToken.objects.get()
    notes = [str(m) for m in response.context["messages"]]
    raws = re.findall(r"chat_[A-Za-z0-9_-]{43}", " ".join(notes))
    assert len(raws) == 1, notes
    assert token.token_hash == tokens.token_hash(raws[0])
    assert api.post(LOBBY_MESSAGES, {"message": "x"}, token=raws[0]).status_code == 201
    # Shown once: pages after that show the prefix, never the token or its hash.
    for page in (TOKENS, f"{TOKENS}{token.pk}/change/"):
        html = admin_client.get(page).content.decode()
        assert token.prefix in html
        assert raws[0] not in html and token.token_hash not in html


@pytest.mark.django_db
def test_admin_revoke_action(admin_client, alice, api):
    token, raw = tokens.api_token_create(owner=alice, name="ci")
    response = admin_client.post(
        TOKENS,
        {"action": "revoke_tokens", "_selected_action": [token.pk]},
    )
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert_error(api.get(API_ROOMS, token=raw), 401, chat_api.ERROR_INVALID_TOKEN)


# ---------------------------------------------------------------------------
# Query-count guards: a changelist costs the same for 1 row as for 20
# ---------------------------------------------------------------------------


def add_room(index: int) -> Room:
    return Room.objects.create(slug=f"room-{index}")


def add_message(index: int) -> Message:
    room = add_room(index)
    author = get_user_model().objects.create_user(f"author{index}")
    return Message.objects.create(
        room=room, seq=1, user=author, author=author.username, body=f"message {index}"
    )


def add_socket(index: int) -> Connection:
    message = add_message(index)
    return Connection.objects.create(
        room=message.room,
        user=message.user,
        channel_name=f"channel-{index}",
        worker=f"worker-{index}",
    )


def add_worker(index: int) -> Worker:
    socket = add_socket(index)
    presence.worker_heartbeat(worker_id=socket.worker)
    return Worker.objects.get(id=socket.worker)


def add_ban(index: int) -> RoomBan:
    message = add_message(index)
    moderator = get_user_model().objects.create_user(f"moderator{index}")
    return RoomBan.objects.create(
        room=message.room, user=message.user, reason="spam", created_by=moderator
    )


def add_action(index: int) -> ModerationAction:
    message = add_message(index)
    moderator = get_user_model().objects.create_user(f"moderator{index}")
    return ModerationAction.objects.create(
        kind=ModerationAction.Kind.DELETE_MESSAGE,
        actor=moderator,
        room=message.room,
        target_user=message.user,
        message=message,
    )


def add_token(index: int) -> ApiToken:
    message = add_message(index)
    token, _ = tokens.api_token_create(
        owner=message.user, name=f"token {index}", can_publish=True, room=message.room
    )
    return token


CHANGELISTS = {
    "room": (ROOMS, add_room),
    "message": (MESSAGES, add_message),
    "connection": (SOCKETS, add_socket),
    "worker": ("/admin/chat/worker/", add_worker),
    "roomban": (BANS, add_ban),
    "moderationaction": ("/admin/chat/moderationaction/", add_action),
    "apitoken": (TOKENS, add_token),
}


def test_every_chat_model_in_the_admin_has_a_query_count_guard():
    from django.contrib import admin

    registered = {
        model._meta.model_name
        for model in admin.site._registry
        if model._meta.app_label == "chat"
    }
    assert registered == set(CHANGELISTS)


def changelist_queries(client: HttpClient, url: str) -> tuple[int, int]:
    """Returns the queries a changelist page cost and the rows it listed."""
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries), len(response.context["cl"].result_list)


@pytest.mark.django_db
@pytest.mark.parametrize("model", sorted(CHANGELISTS))
def test_a_changelist_costs_the_same_queries_for_1_row_and_for_20(
    admin_client, django_assert_num_queries, model
):
    """Query-count guard: no query per row (a column read outside the list's query)."""
    url, add_row = CHANGELISTS[model]
    add_row(0)
    admin_client.get(url)  # caches filled on a first visit do not count
    one_row, listed = changelist_queries(admin_client, url)
    for index in range(1, 20):
        add_row(index)
    with django_assert_num_queries(one_row):
        response = admin_client.get(url)
    # The migrations' "general" room is listed too.
    assert len(response.context["cl"].result_list) == listed + 19


def membership_post(room, rows: list[tuple[int | None, int, bool]]) -> dict[str, str]:
    """The change form's data with membership rows (pk or None, user pk, delete)."""
    data = {
        "connections-TOTAL_FORMS": "0",
        "connections-INITIAL_FORMS": "0",
        "memberships-TOTAL_FORMS": str(len(rows)),
        "memberships-INITIAL_FORMS": str(sum(pk is not None for pk, _, _ in rows)),
    }
    for index, (pk, user, delete) in enumerate(rows):
        prefix = f"memberships-{index}-"
        data[prefix + "room"] = str(room.pk)
        data[prefix + "user"] = str(user)
        if pk is not None:
            data[prefix + "id"] = str(pk)
        if delete:
            data[prefix + "DELETE"] = "on"
    return data


@pytest.mark.django_db(transaction=True)
def test_the_admin_adds_and_removes_members_of_a_private_room(
    admin_client, alice, bob, monkeypatch
):
    from chat import membership

    kicked: list[tuple[int, str]] = []
    monkeypatch.setattr(
        membership, "send_kick", lambda user_id, slug: kicked.append((user_id, slug))
    )
    secret = membership.room_create(slug="secret", user=alice, private=True)
    owner = Membership.objects.get(room=secret, user=alice)
    change = f"{ROOMS}{secret.pk}/change/"
    added = admin_client.post(
        change,
        membership_post(secret, [(owner.pk, alice.pk, False), (None, bob.pk, False)]),
    )
    assert added.status_code == 302, added.content.decode()[:3000]
    assert membership.room_members(secret) == ["alice", "bob"]
    assert kicked == []
    bobs = Membership.objects.get(room=secret, user=bob)
    removed = admin_client.post(
        change,
        membership_post(secret, [(owner.pk, alice.pk, False), (bobs.pk, bob.pk, True)]),
    )
    assert removed.status_code == 302, removed.content.decode()[:3000]
    assert membership.room_members(secret) == ["alice"]
    assert kicked == [(bob.pk, "secret")]


@pytest.mark.django_db
def test_a_public_rooms_read_positions_cannot_be_changed_in_the_admin(
    admin_client, room, alice
):
    from chat import reading

    services.message_post(room=room, user=alice, text="hi")
    reading.read_advance(room=room, user=alice, seq=1)
    row = Membership.objects.get()
    admin_client.post(
        f"{ROOMS}{room.pk}/change/", membership_post(room, [(row.pk, alice.pk, True)])
    )
    assert Membership.objects.filter(pk=row.pk).exists()
