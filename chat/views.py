"""Pages: lobby, room, sign-up. Rendering only; the domain is in services."""

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from chat import protocol, services
from chat.forms import RoomForm, SignUpForm


def room_page_limits() -> dict[str, int]:
    """Returns the server limits the room page's script needs (data-* attributes)."""
    return {
        "max_length": settings.CHAT_MAX_MESSAGE_LENGTH,
        "history_max": settings.CHAT_HISTORY_MAX,
        "typing_interval_ms": settings.CHAT_TYPING_INTERVAL_SECONDS * 1000,
    }


def lobby_page_limits() -> dict[str, str]:
    """Returns the server rules the lobby page's script checks (data-* attributes)."""
    return {"room_name_pattern": protocol.ROOM_NAME_PATTERN.pattern}


@login_required
@require_http_methods(["GET", "POST"])
def lobby(request: HttpRequest) -> HttpResponse:
    """Lists the rooms; the form enters a room, creating it if it is new."""
    form = RoomForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        room, _ = services.room_get_or_create(slug=form.cleaned_data["name"])
        return redirect("chat:room", room=room.slug)
    status = 400 if request.method == "POST" else 200
    return render(
        request,
        "chat/lobby.html",
        {
            "rooms": services.room_list(user=request.user),
            "form": form,
            "limits": lobby_page_limits(),
        },
        status=status,
    )


@login_required
@require_http_methods(["GET"])
def room(request: HttpRequest, room: str) -> HttpResponse:
    """Shows a room; an unknown but valid name offers to create it (404)."""
    if not protocol.is_valid_room_name(room):
        raise Http404("invalid room name")
    found = services.room_get(slug=room)
    if found is None:
        form = RoomForm(initial={"name": room})
        return render(
            request, "chat/room_missing.html", {"name": room, "form": form}, status=404
        )
    return render(
        request,
        "chat/room.html",
        {"room": found, "limits": room_page_limits()},
    )


@require_http_methods(["GET"])
def lobby_rooms(request: HttpRequest) -> JsonResponse:
    """Returns the lobby's room list as JSON, with the user's unread and
    mention counts; the lobby and the room pages poll it."""
    # A 401 rather than login_required's redirect: the caller is a script.
    if not request.user.is_authenticated:
        return JsonResponse({"detail": "not signed in"}, status=401)
    rooms = [
        {
            "room": summary.slug,
            "url": reverse("chat:room", kwargs={"room": summary.slug}),
            "online": summary.online,
            "last_activity": protocol.format_timestamp(summary.last_activity),
            "unread": summary.unread,
            "mentions": summary.mentions,
            "member": summary.member,
        }
        for summary in services.room_list(user=request.user)
    ]
    response = JsonResponse({"rooms": rooms})
    response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """Creates an account and signs it in."""
    if request.user.is_authenticated:
        return redirect("chat:lobby")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("chat:lobby")
    status = 400 if request.method == "POST" else 200
    return render(request, "registration/signup.html", {"form": form}, status=status)
