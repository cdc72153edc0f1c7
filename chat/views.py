"""Pages: lobby, room, sign-up. Rendering only; the domain is in services."""

from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from chat import protocol, services
from chat.forms import RoomForm, SignUpForm


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
        {"rooms": services.room_list(), "form": form},
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
    return render(request, "chat/room.html", {"room": found})


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
