"""The wire format: room names, client frame parsing, `since`, server events (no DB)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args, get_type_hints

import pytest

from chat import protocol
from chat.protocol import (
    HistoryRequest,
    Limits,
    PostMessage,
    ProtocolError,
    Typing,
    encode,
    format_timestamp,
    is_valid_room_name,
    parse_client_frame,
    parse_since,
    room_group_name,
)

LIMITS = Limits(
    max_frame_bytes=1024, max_message_length=10, history_page=50, history_max=200
)
# Frames big enough to nest JSON deeper than the parser's recursion limit.
ROOMY = Limits(
    max_frame_bytes=64 * 1024, max_message_length=10, history_page=50, history_max=200
)


def parse(frame: Any, limits: Limits = LIMITS) -> protocol.ClientCommand:
    """Parses `frame`: text as it is, anything else JSON-encoded first."""
    text = frame if isinstance(frame, str) else json.dumps(frame)
    return parse_client_frame(text, None, limits)


def assert_rejected(
    frame: Any,
    code: str,
    *,
    ref: str | None = None,
    binary: bytes | None = None,
    limits: Limits = LIMITS,
) -> ProtocolError:
    """Asserts that a frame is refused with `code` (and `ref`); returns the error."""
    with pytest.raises(ProtocolError) as caught:
        if frame is None:
            parse_client_frame(None, binary, limits)
        else:
            parse(frame, limits)
    error = caught.value
    assert (error.code, error.ref) == (code, ref), error.detail
    assert error.detail
    return error


# ---------------------------------------------------------------------------
# Room names and groups
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "lobby", "0", "room-1", "room_1", "9lives", "a" * 64, "a-_-b"]
)
def test_lower_case_slugs_of_1_to_64_characters_are_room_names(name):
    assert is_valid_room_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "room\n",  # a "$" anchor would let the trailing newline through
        "\nroom",
        "Lobby",
        "UPPER",
        "٣",  # \d matches Arabic-Indic digits
        "room٣",
        "a" * 65,
        "-room",
        "_room",
        "bad name",
        "room.1",
        "room/1",
        "café",
        None,
        42,
    ],
)
def test_other_strings_and_non_strings_are_not_room_names(name):
    assert not is_valid_room_name(name)


def test_room_group_name_prefixes_the_slug():
    assert room_group_name("lobby") == "room.lobby"
    assert len(room_group_name("a" * 64)) < 100  # Channels' group-name limit


@pytest.mark.parametrize("name", ["", "UPPER", "room\n", "٣", "a" * 65])
def test_room_group_name_refuses_invalid_names(name):
    with pytest.raises(ValueError):
        room_group_name(name)


# ---------------------------------------------------------------------------
# Client frames: commands
# ---------------------------------------------------------------------------


def test_typed_message_frame_is_a_post():
    frame = {"type": "message", "message": "hi", "client_id": "abc-1"}
    assert parse(frame) == PostMessage(text="hi", client_id="abc-1")


def test_tutorial_frame_without_type_is_a_post():
    assert parse({"message": "hi"}) == PostMessage(text="hi", client_id=None)


def test_post_text_is_stripped_and_keeps_inner_newlines_and_tabs():
    assert parse({"message": "  a\n\tb \n"}) == PostMessage(text="a\n\tb")


@pytest.mark.parametrize(
    "client_id", ["a", "A-z_0.9:x", "0f8c3a2e-1b7d-4c55-9a9e-2b8f6f1d2c3e", "x" * 64]
)
def test_post_accepts_client_ids_of_the_allowed_alphabet(client_id):
    assert parse({"message": "hi", "client_id": client_id}).client_id == client_id


def test_null_client_id_means_none():
    assert parse({"message": "hi", "client_id": None}).client_id is None


def test_typing_frame_is_typing():
    assert parse({"type": "typing"}) == Typing()


def test_history_defaults_to_latest_page():
    assert parse({"type": "history"}) == HistoryRequest(before=None, limit=50)


@pytest.mark.parametrize(
    ("before", "limit"), [(1, 1), (5, 200), (2**63, 50), (None, 200)]
)
def test_history_accepts_positive_before_and_limit_within_bounds(before, limit):
    frame = {"type": "history", "before": before, "limit": limit}
    assert parse(frame) == HistoryRequest(before=before, limit=limit)


@pytest.mark.parametrize(
    "fields",
    [
        {"before": 0},
        {"before": -1},
        {"before": True},
        {"before": 3.0},
        {"before": "3"},
        {"limit": 0},
        {"limit": 201},
        {"limit": -5},
        {"limit": True},
        {"limit": False},
        {"limit": 10.0},
        {"limit": "10"},
        {"limit": None},
    ],
)
def test_history_refuses_bad_before_and_limit(fields):
    assert_rejected({"type": "history", **fields}, protocol.ERROR_INVALID_FIELD)


# ---------------------------------------------------------------------------
# Client frames: errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "not json",
        "{'type': 'typing'}",
        '{"message": NaN}',
        '{"message": Infinity}',
        '{"message": -Infinity}',
        '{"type": "typing", "type": "message"}',
        '{"message": "a", "x": {"k": 1, "k": 2}}',
    ],
)
def test_malformed_or_non_strict_json_is_bad_json(text):
    assert_rejected(text, protocol.ERROR_BAD_JSON)


@pytest.mark.parametrize("depth", [5000, 10000])
def test_deeply_nested_json_is_bad_json(depth):
    assert_rejected("[" * depth + "]" * depth, protocol.ERROR_BAD_JSON, limits=ROOMY)
    nested = '{"type":"typing","x":' + "[" * depth + "]" * depth + "}"
    assert_rejected(nested, protocol.ERROR_BAD_JSON, limits=ROOMY)


@pytest.mark.parametrize("text", ["[]", '["message"]', '"hi"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_refused(text):
    assert_rejected(text, protocol.ERROR_NOT_AN_OBJECT)


@pytest.mark.parametrize(
    "frame",
    [
        {},
        {"client_id": "abc"},
        {"type": None},
        {"type": "shout", "message": "hi"},
        {"type": "Message", "message": "hi"},
        {"type": 1, "message": "hi"},
        {"type": ["message"], "message": "hi"},
        {"type": {"k": "message"}},
        {"type": True},
    ],
)
def test_missing_unknown_or_non_string_type_is_unknown_type(frame):
    assert_rejected(frame, protocol.ERROR_UNKNOWN_TYPE)


def test_unknown_type_detail_is_truncated():
    error = assert_rejected({"type": "x" * 500}, protocol.ERROR_UNKNOWN_TYPE)
    assert len(error.detail) < 120


@pytest.mark.parametrize("text", [None, "", " ", "\n\t  \r\n"])
def test_no_text_or_blank_text_is_an_empty_frame(text):
    assert_rejected(text, protocol.ERROR_EMPTY_FRAME, binary=None)


def test_empty_binary_frame_is_an_empty_frame():
    assert_rejected(None, protocol.ERROR_EMPTY_FRAME, binary=b"")


def test_binary_frame_is_refused():
    assert_rejected(None, protocol.ERROR_BINARY_FRAME, binary=b'{"message":"hi"}')


def test_frame_over_the_byte_limit_is_too_large():
    padding = 1024 - len('{"message":"","x":""}')
    at_limit = '{"message":"","x":"' + "a" * padding + '"}'
    assert len(at_limit.encode()) == 1024
    # At the limit the frame is parsed (and refused for its content instead).
    assert_rejected(at_limit, protocol.ERROR_EMPTY_MESSAGE)
    assert_rejected(at_limit[:-2] + 'a"}', protocol.ERROR_FRAME_TOO_LARGE)


def test_frame_limit_counts_utf8_bytes_not_characters():
    text = '{"message":"' + "é" * 600 + '"}'  # 614 characters, 1214 bytes
    assert len(text) < 1024
    assert_rejected(text, protocol.ERROR_FRAME_TOO_LARGE)


def test_frame_too_large_is_checked_before_anything_else():
    assert_rejected(" " * 2000, protocol.ERROR_FRAME_TOO_LARGE)
    assert_rejected("{" * 2000, protocol.ERROR_FRAME_TOO_LARGE)


@pytest.mark.parametrize("message", ["", " ", "\n\t \n"])
def test_blank_message_is_empty_message(message):
    assert_rejected({"message": message}, protocol.ERROR_EMPTY_MESSAGE)


def test_message_at_the_length_limit_passes_and_one_more_is_too_long():
    assert parse({"message": "x" * 10}) == PostMessage(text="x" * 10)
    assert parse({"message": "  " + "é" * 10 + "  "}) == PostMessage(text="é" * 10)
    assert_rejected({"message": "x" * 11}, protocol.ERROR_MESSAGE_TOO_LONG)


@pytest.mark.parametrize(
    "message", [None, 42, 1.5, True, ["hi"], {"text": "hi"}], ids=repr
)
def test_non_string_message_is_invalid(message):
    assert_rejected(
        {"type": "message", "message": message}, protocol.ERROR_INVALID_MESSAGE
    )


def test_typed_post_without_message_is_invalid():
    assert_rejected({"type": "message"}, protocol.ERROR_INVALID_MESSAGE)


@pytest.mark.parametrize(
    "message",
    ["a\ud800b", "\udfff", "a\x00b", "a\x07b", "a\x1bb", "a\rb", "a\x7fb", "a\x85b"],
    ids=repr,
)
def test_lone_surrogates_and_control_characters_are_invalid(message):
    assert_rejected({"message": message}, protocol.ERROR_INVALID_MESSAGE)


def test_lone_surrogate_escape_in_json_text_is_invalid():
    assert_rejected(r'{"message": "\ud800"}', protocol.ERROR_INVALID_MESSAGE)


def test_escaped_surrogate_pair_is_valid_text():
    assert parse(r'{"message": "\ud83d\ude00"}') == PostMessage(text="😀")


@pytest.mark.parametrize(
    "client_id", ["", "x" * 65, "has space", "é", "a/b", 42, True, ["a"]], ids=repr
)
def test_bad_client_id_is_refused_without_ref(client_id):
    frame = {"message": "hi", "client_id": client_id}
    assert_rejected(frame, protocol.ERROR_INVALID_CLIENT_ID, ref=None)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("", protocol.ERROR_EMPTY_MESSAGE),
        ("x" * 11, protocol.ERROR_MESSAGE_TOO_LONG),
        ("a\x00", protocol.ERROR_INVALID_MESSAGE),
        (5, protocol.ERROR_INVALID_MESSAGE),
    ],
)
def test_message_error_echoes_a_valid_client_id_as_ref(message, code):
    frame = {"type": "message", "message": message, "client_id": "c-1"}
    assert_rejected(frame, code, ref="c-1")


# ---------------------------------------------------------------------------
# parse_since
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", b"", "other=1", "since=", b"x=y&z=1"])
def test_since_is_none_when_absent(query):
    assert parse_since(query) is None


@pytest.mark.parametrize(
    ("query", "since"),
    [
        ("since=0", 0),
        ("since=42", 42),
        (b"since=42", 42),
        ("a=1&since=7", 7),
        ("since=3&since=9", 9),
        ("since=" + "9" * 18, 10**18 - 1),
    ],
)
def test_since_is_read_as_an_integer(query, since):
    assert parse_since(query) == since


@pytest.mark.parametrize(
    "query",
    [
        "since=abc",
        "since=-1",
        "since=1.5",
        "since=+5",
        "since=%2B5",
        "since= 5",
        "since=1e3",
        "since=٣",
        "since=%D9%A3",
        b"since=%D9%A3",
        b"since=\xd9\xa3",
        "since=²",
        "since=" + "9" * 19,
    ],
)
def test_since_that_is_not_a_plain_ascii_number_is_refused(query):
    with pytest.raises(ProtocolError) as caught:
        parse_since(query)
    assert caught.value.code == protocol.ERROR_INVALID_SINCE


# ---------------------------------------------------------------------------
# Server events
# ---------------------------------------------------------------------------


def test_timestamp_is_utc_iso_8601_with_milliseconds_and_z():
    moment = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert format_timestamp(moment) == "2024-01-02T03:04:05.678Z"
    assert format_timestamp(moment.replace(microsecond=0)) == "2024-01-02T03:04:05.000Z"


def test_timestamp_converts_other_offsets_to_utc():
    paris = timezone(timedelta(hours=2))
    moment = datetime(2024, 7, 1, 1, 30, 0, 5000, tzinfo=paris)
    assert format_timestamp(moment) == "2024-06-30T23:30:00.005Z"


def test_encode_is_compact_json():
    event = protocol.event_presence(joins=["alice"], leaves=[], members=2)
    assert (
        encode(event) == '{"type":"presence","joins":["alice"],"leaves":[],"members":2}'
    )


def test_a_batch_frame_is_an_array_of_events():
    event = protocol.event_typing(user="alice")
    assert (
        protocol.encode_frame(event, batch=True) == '[{"type":"typing","user":"alice"}]'
    )
    assert (
        protocol.encode_frame(event, batch=False) == '{"type":"typing","user":"alice"}'
    )


def test_members_request_takes_an_optional_username():
    assert parse('{"type":"members"}') == protocol.MembersRequest(after=None)
    assert parse('{"type":"members","after":"bob"}') == protocol.MembersRequest(
        after="bob"
    )
    for bad in (
        '{"type":"members","after":7}',
        '{"type":"members","after":"%s"}' % ("x" * 151),
    ):
        with pytest.raises(protocol.ProtocolError) as error:
            parse(bad)
        assert error.value.code == protocol.ERROR_INVALID_FIELD


def test_encode_keeps_non_ascii_text_as_is():
    event = protocol.event_typing(user="zoë 😀")
    assert encode(event) == '{"type":"typing","user":"zoë 😀"}'
    assert json.loads(encode(event)) == event


def test_message_event_has_the_documented_fields():
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = protocol.event_message(
        id=7, seq=3, room="lobby", user="alice", message="hi", ts=moment, client_id=None
    )
    assert event == {
        "type": "message",
        "id": 7,
        "seq": 3,
        "room": "lobby",
        "user": "alice",
        "message": "hi",
        "ts": "2024-01-02T03:04:05.000Z",
        "client_id": None,
        "mentions": [],
    }


def test_error_event_carries_code_detail_and_ref():
    assert protocol.event_error("bad_json", "nope", "c-1") == {
        "type": "error",
        "code": "bad_json",
        "detail": "nope",
        "ref": "c-1",
    }


SAMPLE_MESSAGE = protocol.event_message(
    id=7,
    seq=3,
    room="lobby",
    user="alice",
    message="hi",
    ts=datetime(2024, 1, 2, tzinfo=UTC),
    client_id=None,
)
SAMPLE_EVENTS = [
    SAMPLE_MESSAGE,
    protocol.event_welcome(
        room="lobby",
        user="alice",
        members=["alice"],
        member_count=1,
        messages=[SAMPLE_MESSAGE],
        has_more=False,
    ),
    protocol.event_members(after="alice", members=["bob"], has_more=False),
    protocol.event_history(before=3, messages=[SAMPLE_MESSAGE], has_more=False),
    protocol.event_presence(joins=["bob"], leaves=[], members=2),
    protocol.event_typing(user="bob"),
    protocol.event_deleted(id=7, seq=3, deletion=1),
    protocol.event_room_state(closed=True),
    protocol.event_push(event="build.finished", data={"ok": True}),
    protocol.event_read(room="lobby", seq=3),
    protocol.event_mention(room="lobby", id=7, seq=3, user="bob", message="@alice hi"),
    protocol.event_error("bad_json", "nope"),
]


def test_every_event_constructor_returns_a_server_event():
    constructors = {
        name: function
        for name, function in vars(protocol).items()
        if name.startswith("event_") and callable(function)
    }
    returned = {name: get_type_hints(f)["return"] for name, f in constructors.items()}
    assert set(returned.values()) == set(get_args(protocol.ServerEvent)), returned


def test_the_samples_cover_every_server_event_type():
    kinds = sorted(event["type"] for event in SAMPLE_EVENTS)
    assert kinds == sorted(protocol.server_event_types())


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda event: event["type"])
def test_each_event_has_exactly_the_fields_of_its_type(event):
    typed = protocol.server_event_types()[event["type"]]
    assert set(event) == set(get_type_hints(typed)), typed.__name__
    assert json.loads(encode(event)) == event, "every field is plain JSON"
