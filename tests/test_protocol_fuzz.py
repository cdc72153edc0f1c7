"""chat.protocol.parse_client_frame under fuzzing (no DB): whatever a client
sends, it returns a command or raises ProtocolError with a documented code.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st

from chat import protocol
from tests.strategies import client_frames

LIMITS = protocol.Limits(
    max_frame_bytes=16 * 1024, max_message_length=2000, history_page=50, history_max=200
)
# Every code parse_client_frame may raise: the ERROR_* constants.
ERROR_CODES = {
    value for name, value in vars(protocol).items() if name.startswith("ERROR_")
}
COMMANDS = get_args(protocol.ClientCommand)

FUZZ = settings(max_examples=500, deadline=None, database=None)


def assert_command_or_protocol_error(text: str | None, binary: bytes | None) -> None:
    try:
        command = protocol.parse_client_frame(text, binary, LIMITS)
    except protocol.ProtocolError as error:
        assert error.code in ERROR_CODES, error.code
        assert isinstance(error.detail, str) and error.detail
        assert error.ref is None or isinstance(error.ref, str)
        # The error frame it becomes must encode, whatever the input was.
        protocol.encode(protocol.event_error(error.code, error.detail, error.ref))
        return
    assert isinstance(command, COMMANDS), command
    assert_command_is_clean(command)


def assert_command_is_clean(command: Any) -> None:
    """What a command carries is what the services may store and echo."""
    if isinstance(command, protocol.PostMessage):
        assert isinstance(command.text, str)
        assert command.text == command.text.strip() and command.text
        assert len(command.text) <= LIMITS.max_message_length
        command.text.encode("utf-8")  # no lone surrogate
        assert command.client_id is None or protocol.CLIENT_ID_PATTERN.fullmatch(
            command.client_id
        )
    elif isinstance(command, protocol.HistoryRequest):
        assert command.before is None or (
            type(command.before) is int and command.before >= 1
        )
        assert type(command.limit) is int
        assert 1 <= command.limit <= LIMITS.history_max
    elif isinstance(command, protocol.MembersRequest):
        assert command.after is None or isinstance(command.after, str)
    else:
        assert fields(command) == ()


@FUZZ
@given(client_frames)
def test_any_json_value_parses_to_a_command_or_a_protocol_error(value: Any):
    assert_command_or_protocol_error(json.dumps(value), None)


@FUZZ
@given(client_frames)
def test_json_without_ascii_escapes_parses_the_same_way(value: Any):
    """Frames as a browser sends them: UTF-8 text, not \\u escapes."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except UnicodeEncodeError:
        return
    assert_command_or_protocol_error(text, None)


@FUZZ
@given(st.text(st.characters(exclude_categories=())))
def test_any_text_parses_to_a_command_or_a_protocol_error(text: str):
    assert_command_or_protocol_error(text, None)


@FUZZ
@given(st.binary())
def test_any_binary_frame_is_refused(data: bytes):
    try:
        protocol.parse_client_frame(None, data, LIMITS)
    except protocol.ProtocolError as error:
        expected = protocol.ERROR_BINARY_FRAME if data else protocol.ERROR_EMPTY_FRAME
        assert error.code == expected
    else:
        raise AssertionError("a binary frame was accepted")


def test_the_checks_catch_a_command_that_is_not_clean():
    """The property's own check fails on a command the parser must not return."""
    try:
        assert_command_is_clean(protocol.PostMessage(text=" padded "))
    except AssertionError:
        return
    raise AssertionError("an unstripped post passed the check")
