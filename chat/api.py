"""HTTP publish, push and read API for other systems (docs/api.md, docs/openapi.json).

Thin: bearer token → rate limit → scope → validate → the same services the
socket uses. Every answer is JSON, errors included, as
{"error": <code>, "detail": <text>}; nothing here renders HTML or a traceback.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from chat import moderation, protocol, reading, services, tokens
from chat.broadcast import LAYER_ERRORS
from chat.limits import frame_limits
from chat.models import ApiToken, Room

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Error codes and their HTTP status (one table: docs/api.md lists it)
# ---------------------------------------------------------------------------

ERROR_MISSING_FIELD = "missing_field"
ERROR_MISSING_TOKEN = "missing_token"
ERROR_INVALID_TOKEN = "invalid_token"
ERROR_UNKNOWN_ROOM = "unknown_room"
ERROR_UNKNOWN_USER = "unknown_user"
ERROR_NOT_FOUND = "not_found"
ERROR_METHOD_NOT_ALLOWED = "method_not_allowed"
ERROR_BODY_TOO_LARGE = "body_too_large"
ERROR_UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
ERROR_SERVER_ERROR = "server_error"
# What Django itself answers under /api/ (a bad Host header, say), as JSON.
ERROR_BAD_REQUEST = "bad_request"
ERROR_FORBIDDEN = "forbidden"
# The token's owner is banned from the room: the API is no way around a ban.
ERROR_BANNED = "banned"

ERROR_STATUS: dict[str, int] = {
    ERROR_BAD_REQUEST: 400,
    protocol.ERROR_BAD_JSON: 400,
    protocol.ERROR_NOT_AN_OBJECT: 400,
    ERROR_MISSING_FIELD: 400,
    protocol.ERROR_INVALID_FIELD: 400,
    protocol.ERROR_INVALID_SINCE: 400,
    protocol.ERROR_EMPTY_MESSAGE: 400,
    protocol.ERROR_MESSAGE_TOO_LONG: 400,
    protocol.ERROR_INVALID_MESSAGE: 400,
    protocol.ERROR_INVALID_CLIENT_ID: 400,
    ERROR_MISSING_TOKEN: 401,
    ERROR_FORBIDDEN: 403,
    ERROR_BANNED: 403,
    ERROR_INVALID_TOKEN: 401,
    tokens.FORBIDDEN_SCOPE: 403,
    tokens.FORBIDDEN_ROOM: 403,
    tokens.FORBIDDEN_USER: 403,
    ERROR_UNKNOWN_ROOM: 404,
    ERROR_UNKNOWN_USER: 404,
    ERROR_NOT_FOUND: 404,
    ERROR_METHOD_NOT_ALLOWED: 405,
    protocol.ERROR_ROOM_CLOSED: 409,
    ERROR_BODY_TOO_LARGE: 413,
    ERROR_UNSUPPORTED_MEDIA_TYPE: 415,
    protocol.ERROR_RATE_LIMITED: 429,
    ERROR_SERVER_ERROR: 500,
    protocol.ERROR_UNAVAILABLE: 503,
}

# A push's event name: the same alphabet as a client_id.
EVENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
BEARER = re.compile(r"Bearer[ \t]+([^ \t]+)[ \t]*", re.IGNORECASE)
AUTH_REALM = 'Bearer realm="chat"'


class ApiError(Exception):
    """Any refused request; becomes one JSON error response in api_endpoint."""

    def __init__(
        self, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = ERROR_STATUS.get(code, 400)
        self.headers = headers or {}


def error_response(error: ApiError) -> JsonResponse:
    response = JsonResponse(
        {"error": error.code, "detail": error.detail}, status=error.status
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


def json_response(data: dict[str, Any], status: int = 200) -> JsonResponse:
    return JsonResponse(data, status=status, json_dumps_params={"ensure_ascii": False})


# ---------------------------------------------------------------------------
# The request pipeline: method, token, rate, then the view
# ---------------------------------------------------------------------------

View = Callable[..., JsonResponse]


def _bearer_token(request: HttpRequest) -> ApiToken:
    header = request.headers.get("Authorization", "")
    match = BEARER.fullmatch(header)
    if match is None:
        raise ApiError(
            ERROR_MISSING_TOKEN,
            "send the token as 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": AUTH_REALM},
        )
    try:
        return tokens.api_token_authenticate(raw=match.group(1))
    except tokens.InvalidToken as refused:
        raise ApiError(
            ERROR_INVALID_TOKEN,
            str(refused),
            {"WWW-Authenticate": f'{AUTH_REALM}, error="invalid_token"'},
        ) from None


def _rate_check(token: ApiToken) -> None:
    try:
        tokens.api_token_rate_check(token=token)
    except tokens.RateLimited as limited:
        # Retry-After takes whole seconds; rounding down would retry too early.
        seconds = max(1, math.ceil(limited.retry_after))
        raise ApiError(
            protocol.ERROR_RATE_LIMITED,
            f"too many requests for this token; retry in {seconds} s",
            {"Retry-After": str(seconds)},
        ) from None


def api_endpoint(*methods: str) -> Callable[[View], View]:
    """Makes `view(request, token, **kwargs)` an API endpoint for `methods`.

    CSRF is not checked: a token in a header is not sent by a browser on its
    own, and session cookies authenticate nothing here.
    """

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        def endpoint(request: HttpRequest, **kwargs: Any) -> JsonResponse:
            try:
                if request.method not in methods:
                    raise ApiError(
                        ERROR_METHOD_NOT_ALLOWED,
                        f"{request.method} is not allowed here",
                        {"Allow": ", ".join(methods)},
                    )
                token = _bearer_token(request)
                _rate_check(token)
                return view(request, token, **kwargs)
            except ApiError as error:
                return error_response(error)
            except tokens.TokenForbidden as refused:
                return error_response(_forbidden(refused))
            except protocol.ProtocolError as error:
                # The socket's rules, answered in HTTP: bad fields are 400, a
                # closed room (from message_post) is 409 (see ERROR_STATUS).
                return error_response(ApiError(error.code, error.detail))
            except LAYER_ERRORS:
                # Only a push can hit this: a publish is stored first and its
                # broadcast is best effort (pollers and reconnecting pages
                # still get it).
                logger.warning(
                    "API %s %s: channel layer unreachable", request.method, request.path
                )
                return error_response(
                    ApiError(
                        protocol.ERROR_UNAVAILABLE,
                        "the channel layer (Redis) is unreachable; retry shortly",
                        {"Retry-After": "5"},
                    )
                )
            except DatabaseError:
                # Locked past its busy timeout, or down: nothing was stored.
                logger.warning(
                    "API %s %s: the database does not answer",
                    request.method,
                    request.path,
                    exc_info=True,
                )
                return error_response(
                    ApiError(
                        protocol.ERROR_UNAVAILABLE,
                        "the database does not answer; retry shortly",
                        {"Retry-After": "5"},
                    )
                )
            except Exception:
                # Log the traceback; the client gets none.
                logger.exception("API error on %s %s", request.method, request.path)
                return error_response(
                    ApiError(ERROR_SERVER_ERROR, "internal error; it has been logged")
                )

        return endpoint

    return decorate


@csrf_exempt
def not_found(request: HttpRequest, **kwargs: Any) -> JsonResponse:
    """Answers any /api/ path that is not an endpoint."""
    return error_response(ApiError(ERROR_NOT_FOUND, "no such API endpoint"))


# ---------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------


def read_json_object(request: HttpRequest) -> dict[str, Any]:
    """Returns the JSON object in the body, checking type, size and syntax."""
    charset = (request.content_params or {}).get("charset", "utf-8").lower()
    if request.content_type != "application/json" or charset not in {
        "utf-8",
        "utf8",
    }:
        raise ApiError(
            ERROR_UNSUPPORTED_MEDIA_TYPE,
            "send the body as 'Content-Type: application/json' (UTF-8)",
        )
    limit = settings.CHAT_API_MAX_BODY_BYTES
    too_large = ApiError(ERROR_BODY_TOO_LARGE, f"the body is over {limit} bytes")
    try:
        declared = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise too_large
    # Read one byte past the limit: the declared length may be absent or wrong.
    body = request.read(limit + 1)
    if len(body) > limit:
        raise too_large
    try:
        data = protocol.loads_strict(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(protocol.ERROR_BAD_JSON, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(protocol.ERROR_NOT_AN_OBJECT, "the body must be a JSON object")
    return data


def _require(body: dict[str, Any], field: str) -> Any:
    if field not in body:
        raise ApiError(ERROR_MISSING_FIELD, f"the body has no {field!r}")
    return body[field]


def _query_int(
    request: HttpRequest, name: str, default: int, low: int, high: int
) -> int:
    values = request.GET.getlist(name)
    if not values:
        return default
    value = values[-1]
    # str.isdigit accepts non-ASCII digits; these are plain ASCII.
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ApiError(
            protocol.ERROR_INVALID_FIELD,
            f"{name} must be an integer from {low} to {high}",
        )
    return int(value)


def _room(slug: str, user) -> Room:
    # A private room the token's owner is not in is as missing as no room.
    room = services.room_get(slug=slug, user=user)
    if room is None:
        raise ApiError(ERROR_UNKNOWN_ROOM, f"no room named {slug[:64]!r}")
    return room


def _room_for(token: ApiToken, slug: str) -> Room:
    """The room, if the token's owner may read and post there (not banned)."""
    room = _room(slug, token.owner)
    if moderation.banned_pairs([(room, token.owner)]):
        raise ApiError(ERROR_BANNED, "the token's owner is banned from this room")
    return room


def _forbidden(refused: tokens.TokenForbidden) -> ApiError:
    headers = {}
    if refused.code == tokens.FORBIDDEN_SCOPE:
        headers["WWW-Authenticate"] = f'{AUTH_REALM}, error="insufficient_scope"'
    return ApiError(refused.code, refused.detail, headers)


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


@api_endpoint("GET")
def rooms(request: HttpRequest, token: ApiToken) -> JsonResponse:
    """GET /api/rooms/: rooms with their online count and last activity, and
    the token owner's unread and mention counts."""
    only = tokens.api_token_readable_slug(token=token)
    return json_response(
        {
            "rooms": [
                {
                    "room": summary.slug,
                    "online": summary.online,
                    "last_activity": protocol.format_timestamp(summary.last_activity),
                    "unread": summary.unread,
                    "mentions": summary.mentions,
                    "member": summary.member,
                }
                for summary in services.room_list(user=token.owner)
                if only is None or summary.slug == only
            ]
        }
    )


@api_endpoint("GET", "POST")
def room_messages(request: HttpRequest, token: ApiToken, room: str) -> JsonResponse:
    """GET: poll a room's messages; POST: publish one."""
    if request.method == "POST":
        return _publish(request, token, room)
    return _poll(request, token, room)


def _poll(request: HttpRequest, token: ApiToken, slug: str) -> JsonResponse:
    tokens.api_token_check_read(token=token, slug=slug)
    room = _room_for(token, slug)
    since = protocol.parse_since(request.META.get("QUERY_STRING", ""))
    limit = _query_int(
        request,
        "limit",
        default=settings.CHAT_HISTORY_PAGE,
        low=1,
        high=settings.CHAT_HISTORY_MAX,
    )
    if since is None:
        # No cursor yet: the newest page, as a page that opens the room sees.
        events = services.room_history(room=room, before=None, limit=limit).events
        has_more = False
    else:
        events, has_more = services.room_messages_after(
            room=room, since=since, limit=limit
        )
    next_since = events[-1]["seq"] if events else (since or 0)
    return json_response(
        {
            "room": room.slug,
            "messages": events,
            "has_more": has_more,
            "next_since": next_since,
        }
    )


def _publish(request: HttpRequest, token: ApiToken, slug: str) -> JsonResponse:
    tokens.api_token_check_publish(token=token, slug=slug)
    room = _room_for(token, slug)
    body = read_json_object(request)
    _require(body, "message")
    post = protocol.parse_post(
        body, frame_limits(max_frame_bytes=settings.CHAT_API_MAX_BODY_BYTES)
    )
    message, created = services.message_post(
        room=room,
        user=token.owner,
        text=post.text,
        client_id=post.client_id,
        author=token.author_name or None,
    )
    event = services.message_event(message, room_slug=room.slug)
    # A repeated client_id gets the first copy back, with 200 instead of 201.
    return json_response(event, status=201 if created else 200)


@api_endpoint("POST")
def room_read(request: HttpRequest, token: ApiToken, room: str) -> JsonResponse:
    """POST /api/rooms/<room>/read/: the token owner has read up to `seq`."""
    tokens.api_token_check_read(token=token, slug=room)
    found = _room_for(token, room)
    body = read_json_object(request)
    _require(body, "seq")
    command = protocol.parse_read(body)
    moved = reading.read_advance(room=found, user=token.owner, seq=command.seq)
    position = (
        moved
        if moved is not None
        else reading.read_positions([(found, token.owner)]).get(
            (found.pk, token.owner.pk), 0
        )
    )
    return json_response(
        {"room": found.slug, "read_seq": position, "moved": moved is not None}
    )


@api_endpoint("POST")
def user_push(request: HttpRequest, token: ApiToken, username: str) -> JsonResponse:
    """POST /api/users/<username>/push/: an event to every socket of a user."""
    tokens.api_token_check_push(token=token, username=username)
    user = services.user_get(username=username)
    if user is None:
        raise ApiError(ERROR_UNKNOWN_USER, f"no user named {username[:150]!r}")
    body = read_json_object(request)
    event = _require(body, "event")
    if not isinstance(event, str) or EVENT_NAME_PATTERN.fullmatch(event) is None:
        raise ApiError(
            protocol.ERROR_INVALID_FIELD,
            "event must be 1-64 characters of letters, digits and _ . : -",
        )
    sockets = services.user_push(user=user, event=event, data=body.get("data"))
    return json_response({"sockets": sockets}, status=202)


# ---------------------------------------------------------------------------
# Django's own answers under /api/, as JSON
# ---------------------------------------------------------------------------

# The code for an error answer Django made, by status; other 4xx are
# bad_request and other 5xx server_error.
DJANGO_ERROR_CODES = {
    403: ERROR_FORBIDDEN,
    404: ERROR_NOT_FOUND,
    405: ERROR_METHOD_NOT_ALLOWED,
    413: ERROR_BODY_TOO_LARGE,
}


def is_api_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def as_api_error(request: HttpRequest, response: Any) -> Any:
    """An error answer under /api/ that is not the API's own becomes JSON.

    Django answers some requests before any view runs (a Host header not in
    ALLOWED_HOSTS, a CSRF failure, an error page in DEBUG), and those answers
    are HTML; an API client gets the same {"error", "detail"} body as from
    the API's views, with the status Django chose.
    """
    if (
        response.status_code < 400
        or not is_api_path(request.path)
        or response.get("Content-Type", "").startswith("application/json")
    ):
        return response
    status = response.status_code
    code = DJANGO_ERROR_CODES.get(
        status, ERROR_SERVER_ERROR if status >= 500 else ERROR_BAD_REQUEST
    )
    detail = response.reason_phrase or "the request was refused"
    answer = JsonResponse({"error": code, "detail": detail}, status=status)
    for name in ("Allow", "Retry-After", "WWW-Authenticate"):
        if name in response:
            answer[name] = response[name]
    return answer
