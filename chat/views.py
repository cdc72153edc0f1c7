"""Pages: lobby, room, sign-up. Rendering only; the domain is in services."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from chat import membership, protocol, services
from chat.forms import MemberForm, RoomForm, SignUpForm


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
        try:
            room = membership.room_enter_or_create(
                slug=form.cleaned_data["name"],
                user=request.user,
                private=form.cleaned_data["private"],
            )
        except membership.RoomNameTaken:
            form.add_error("name", "That name is taken: choose another.")
        except ValueError:
            form.add_error(
                "name", "Names that start with dm- are kept for direct messages."
            )
        else:
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
    """Shows a room; an unknown but valid name offers to create it (404).

    A private room the user is not in gets the same answer as a missing one.
    """
    if not protocol.is_valid_room_name(room):
        raise Http404("invalid room name")
    found = services.room_get(slug=room, user=request.user)
    if found is None:
        form = RoomForm(initial={"name": room})
        return render(
            request, "chat/room_missing.html", {"name": room, "form": form}, status=404
        )
    partner = membership.direct_partner(found, request.user)
    return render(
        request,
        "chat/room.html",
        {
            "room": found,
            # A direct message is called after the other person.
            "room_title": f"@{partner}" if partner else f"#{found.slug}",
            "limits": room_page_limits(),
            "partner": partner,
            "can_manage": membership.can_manage(found, request.user),
            "members": membership.room_members(found) if not found.is_public else [],
            "member_form": MemberForm(),
        },
    )


@login_required
@require_http_methods(["GET"])
def direct(request: HttpRequest, username: str) -> HttpResponse:
    """Opens the direct message with `username` (made the first time)."""
    other = services.user_get(username=username)
    if other is None:
        raise Http404("no such user")
    try:
        room = membership.direct_room(user=request.user, other=other)
    except membership.MembershipRefused:
        raise Http404("no direct message with yourself") from None
    return redirect("chat:room", room=room.slug)


@login_required
@require_http_methods(["POST"])
def member_add(request: HttpRequest, room: str) -> HttpResponse:
    """Adds a member to a private room (its creator only)."""
    found = services.room_get(slug=room, user=request.user)
    if found is None:
        raise Http404("no such room")
    form = MemberForm(request.POST)
    user = services.user_get(username=form.data.get("username", "").strip())
    if not form.is_valid() or user is None:
        messages.error(request, "No user has that name.")
        return redirect("chat:room", room=found.slug)
    try:
        membership.member_add(room=found, user=user, actor=request.user)
    except membership.MembershipRefused as refused:
        messages.error(request, str(refused).capitalize() + ".")
    else:
        messages.success(request, f"{user.get_username()} can now enter #{found.slug}.")
    return redirect("chat:room", room=found.slug)


@login_required
@require_http_methods(["POST"])
def member_remove(request: HttpRequest, room: str, username: str) -> HttpResponse:
    """Removes a member from a private room (its creator; anyone may leave)."""
    found = services.room_get(slug=room, user=request.user)
    user = services.user_get(username=username)
    if found is None or user is None:
        raise Http404("no such room or member")
    try:
        membership.member_remove(room=found, user=user, actor=request.user)
    except membership.MembershipRefused as refused:
        messages.error(request, str(refused).capitalize() + ".")
        return redirect("chat:room", room=found.slug)
    if user.pk == request.user.pk:
        messages.success(request, f"You left #{found.slug}.")
        return redirect("chat:lobby")
    messages.success(request, f"{user.get_username()} was removed from #{found.slug}.")
    return redirect("chat:room", room=found.slug)


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
            "kind": summary.kind,
            "partner": summary.partner,
            "title": summary.title,
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
