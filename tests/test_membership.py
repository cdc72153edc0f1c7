"""Private rooms and direct messages: who may enter, on every path (socket,
page, lists, history, the API, mentions), and members added and removed."""

from __future__ import annotations

import pytest
from django.test import Client as HttpClient

from chat import membership, protocol, reading, services
from chat.models import Membership, Mention, Room
from tests.conftest import db, post

# ---------------------------------------------------------------------------
# The functions
# ---------------------------------------------------------------------------


@pytest.fixture
def secret(db, alice) -> Room:
    """A private room of alice's."""
    return membership.room_create(slug="secret", user=alice, private=True)


@pytest.mark.django_db
def test_a_private_room_is_its_creators_and_nobody_elses(secret, alice, bob):
    assert secret.kind == Room.Kind.PRIVATE and secret.created_by == alice
    assert membership.room_visible(secret, alice)
    assert not membership.room_visible(secret, bob)
    assert membership.room_members(secret) == ["alice"]


@pytest.mark.django_db
def test_only_the_creator_adds_and_removes_members(secret, alice, bob, make_user):
    carol = make_user("carol")
    with pytest.raises(membership.MembershipRefused):
        membership.member_add(room=secret, user=carol, actor=bob)
    membership.member_add(room=secret, user=bob, actor=alice)
    assert membership.room_visible(secret, bob)
    with pytest.raises(membership.MembershipRefused):
        membership.member_add(room=secret, user=carol, actor=bob)
    with pytest.raises(membership.MembershipRefused):
        membership.member_remove(room=secret, user=alice, actor=bob)
    assert membership.member_remove(room=secret, user=bob, actor=alice)
    assert not membership.room_visible(secret, bob)
    assert not membership.member_remove(room=secret, user=bob, actor=alice)


@pytest.mark.django_db
def test_a_member_may_leave(secret, alice, bob):
    membership.member_add(room=secret, user=bob, actor=alice)
    assert membership.member_remove(room=secret, user=bob, actor=bob)
    assert membership.room_members(secret) == ["alice"]


@pytest.mark.django_db
def test_public_rooms_have_no_members_to_manage(room, alice, bob):
    with pytest.raises(membership.MembershipRefused):
        membership.member_add(room=room, user=bob, actor=alice)
    with pytest.raises(membership.MembershipRefused):
        membership.member_remove(room=room, user=bob, actor=None)


@pytest.mark.django_db
def test_a_direct_message_is_one_room_of_two_whoever_opens_it(alice, bob, make_user):
    first = membership.direct_room(user=alice, other=bob)
    again = membership.direct_room(user=bob, other=alice)
    assert first == again and first.kind == Room.Kind.DIRECT
    assert membership.room_members(first) == ["alice", "bob"]
    assert membership.direct_partner(first, alice) == "bob"
    assert membership.direct_partner(first, bob) == "alice"
    assert not membership.room_visible(first, make_user("carol"))
    assert not membership.can_manage(first, alice)
    with pytest.raises(membership.MembershipRefused):
        membership.direct_room(user=alice, other=alice)


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["dm", "dm-1-2", "dm-x"])
def test_names_of_direct_messages_cannot_be_taken(alice, name):
    with pytest.raises(ValueError):
        membership.room_enter_or_create(slug=name, user=alice)


@pytest.mark.django_db
def test_entering_a_private_name_one_may_not_see_is_taken(secret, alice, bob):
    assert membership.room_enter_or_create(slug="secret", user=alice) == secret
    with pytest.raises(membership.RoomNameTaken):
        membership.room_enter_or_create(slug="secret", user=bob, private=True)
    assert Room.objects.filter(slug="secret").count() == 1


@pytest.mark.django_db
def test_lists_show_a_private_room_to_its_members_only(secret, room, alice, bob):
    def slugs(user) -> set[str]:
        return {summary.slug for summary in services.room_list(user=user)}

    assert "secret" in slugs(alice) and "lobby" in slugs(alice)
    assert "secret" not in slugs(bob) and "lobby" in slugs(bob)
    assert "secret" not in {s.slug for s in services.room_list()}
    dm = membership.direct_room(user=alice, other=bob)
    listed = {s.slug: s for s in services.room_list(user=bob)}
    assert listed[dm.slug].kind == "direct" and listed[dm.slug].partner == "alice"
    assert listed["lobby"].partner is None


@pytest.mark.django_db
def test_a_new_member_has_the_rooms_messages_unread(secret, alice, bob):
    for n in range(3):
        services.message_post(room=secret, user=alice, text=f"before {n}")
    membership.member_add(room=secret, user=bob, actor=alice)
    listed = {s.slug: s for s in services.room_list(user=bob)}
    assert (listed["secret"].unread, listed["secret"].member) == (3, True)


@pytest.mark.django_db
def test_only_members_of_a_private_room_can_be_mentioned(secret, alice, bob, make_user):
    carol = make_user("carol")
    membership.member_add(room=secret, user=carol, actor=alice)
    message, _ = services.message_post(room=secret, user=alice, text="@bob @carol")
    assert message.mentions == ["carol"]
    assert list(Mention.objects.values_list("user__username", flat=True)) == ["carol"]


# ---------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------

sockets = pytest.mark.django_db(transaction=True)


@sockets
async def test_a_non_member_cannot_connect_and_hears_what_a_missing_room_says(
    connect, alice, bob
):
    await db(membership.room_create, slug="secret", user=alice, private=True)
    refused = await connect(bob, "secret", welcome=False)
    missing = await connect(bob, "nowhere", welcome=False)
    assert await refused.receive_close() == protocol.CLOSE_NO_SUCH_ROOM
    assert await missing.receive_close() == protocol.CLOSE_NO_SUCH_ROOM
    assert await db(Membership.objects.filter(user=bob).count) == 0


@sockets
async def test_members_chat_in_a_private_room(connect, alice, bob):
    secret = await db(membership.room_create, slug="secret", user=alice, private=True)
    await db(membership.member_add, room=secret, user=bob, actor=alice)
    writer, _ = await connect(alice, "secret")
    reader, welcome = await connect(bob, "secret")
    assert welcome["read_seq"] == 0
    message = await post(writer, "only us")
    assert (await reader.receive_type("message"))["seq"] == message["seq"]


@sockets
async def test_removing_a_member_closes_their_sockets_and_keeps_them_out(
    connect, alice, bob, make_user
):
    secret = await db(membership.room_create, slug="secret", user=alice, private=True)
    await db(membership.member_add, room=secret, user=bob, actor=alice)
    tab_one, _ = await connect(bob, "secret")
    tab_two, _ = await connect(bob, "secret")
    await db(Room.objects.create, slug="elsewhere")
    elsewhere, _ = await connect(bob, "elsewhere")
    owner, _ = await connect(alice, "secret")
    await db(membership.member_remove, room=secret, user=bob, actor=alice)
    for client in (tab_one, tab_two):
        assert await client.receive_close() == protocol.CLOSE_FORBIDDEN
    again = await connect(bob, "secret", welcome=False)
    assert await again.receive_close() == protocol.CLOSE_NO_SUCH_ROOM
    # Their other rooms and the owner's socket are untouched.
    await post(owner, "still here")
    assert await elsewhere.receive_nothing()


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------


def signed_in(user) -> HttpClient:
    client = HttpClient()
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_the_room_page_of_a_private_room_is_a_missing_room_to_others(
    secret, alice, bob
):
    assert signed_in(alice).get("/chat/secret/").status_code == 200
    refused = signed_in(bob).get("/chat/secret/")
    missing = signed_in(bob).get("/chat/nowhere/")
    assert refused.status_code == missing.status_code == 404
    assert refused.templates[0].name == missing.templates[0].name


@pytest.mark.django_db
def test_the_lobby_creates_a_private_room_and_refuses_a_taken_name(alice, bob):
    answer = signed_in(alice).post("/chat/", {"name": "plans", "private": "on"})
    assert answer.status_code == 302
    plans = Room.objects.get(slug="plans")
    assert plans.kind == Room.Kind.PRIVATE
    taken = signed_in(bob).post("/chat/", {"name": "plans"})
    assert taken.status_code == 400
    assert "That name is taken" in taken.content.decode()
    kept = signed_in(bob).post("/chat/", {"name": "dm-1-2"})
    assert kept.status_code == 400 and not Room.objects.filter(slug="dm-1-2").exists()


@pytest.mark.django_db
def test_the_rooms_json_lists_only_visible_rooms_with_their_kind(secret, alice, bob):
    dm = membership.direct_room(user=alice, other=bob)
    mine = signed_in(alice).get("/chat/rooms.json").json()["rooms"]
    theirs = signed_in(bob).get("/chat/rooms.json").json()["rooms"]
    assert {r["room"]: r["kind"] for r in mine}["secret"] == "private"
    assert "secret" not in {r["room"] for r in theirs}
    assert {r["room"]: r["partner"] for r in theirs}[dm.slug] == "alice"


@pytest.mark.django_db
def test_a_direct_message_opens_from_a_name(alice, bob):
    answer = signed_in(alice).get("/chat/dm/bob/")
    dm = Room.objects.get(kind=Room.Kind.DIRECT)
    assert answer.status_code == 302 and answer["Location"] == f"/chat/{dm.slug}/"
    assert signed_in(bob).get("/chat/dm/alice/")["Location"] == f"/chat/{dm.slug}/"
    assert signed_in(alice).get("/chat/dm/nobody/").status_code == 404
    assert signed_in(alice).get("/chat/dm/alice/").status_code == 404
    page = signed_in(alice).get(f"/chat/{dm.slug}/").content.decode()
    assert "@bob" in page


@pytest.mark.django_db
def test_the_creator_adds_and_removes_members_from_the_page(secret, alice, bob):
    owner = signed_in(alice)
    answer = owner.post("/chat/secret/members/", {"username": "bob"})
    assert answer.status_code == 302
    assert membership.room_members(secret) == ["alice", "bob"]
    # A member who is not the creator cannot add or remove others.
    assert (
        signed_in(bob).post("/chat/secret/members/", {"username": "alice"}).status_code
        == 302
    )
    unknown = owner.post("/chat/secret/members/", {"username": "nobody"}, follow=True)
    assert "No user has that name" in unknown.content.decode()
    owner.post("/chat/secret/members/bob/remove/")
    assert membership.room_members(secret) == ["alice"]
    # A non-member cannot even find the room to change it.
    assert (
        signed_in(bob).post("/chat/secret/members/", {"username": "bob"}).status_code
        == 404
    )
    assert membership.room_members(secret) == ["alice"]


@pytest.mark.django_db
def test_a_member_leaves_from_the_page(secret, alice, bob):
    membership.member_add(room=secret, user=bob, actor=alice)
    answer = signed_in(bob).post("/chat/secret/members/bob/remove/")
    assert answer.status_code == 302 and answer["Location"] == "/chat/"
    assert membership.room_members(secret) == ["alice"]


# ---------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_api_treats_a_private_room_as_missing_for_a_non_member(
    secret, alice, bob, api, make_token
):
    services.message_post(room=secret, user=alice, text="private")
    outsider = make_token(owner=bob, can_publish=True)
    insider = make_token(owner=alice, can_publish=True)
    for path, data in [
        ("/api/rooms/secret/messages/", None),
        ("/api/rooms/secret/messages/", {"message": "let me in"}),
        ("/api/rooms/secret/read/", {"seq": 1}),
    ]:
        if data is None:
            answer = api.get(path, token=outsider)
        else:
            answer = api.post(path, data, token=outsider)
        assert answer.status_code == 404, path
        assert answer.json()["error"] == "unknown_room"
    listed = api.get("/api/rooms/", token=outsider).json()["rooms"]
    assert "secret" not in {r["room"] for r in listed}
    assert api.get("/api/rooms/secret/messages/", token=insider).status_code == 200
    assert [m.body for m in secret.messages.all()] == ["private"]
    assert reading.read_positions([(secret, bob)]) == {}
