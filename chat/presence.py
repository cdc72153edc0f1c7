"""Who is in which room: one Connection row per open socket, users derived from them.

A user joins with their first socket in a room and leaves with their last one, so
a second tab is not a second person. Each worker process holds a lease (a Worker
row it renews); only sockets of live workers count, and the sockets of a worker
whose lease ran out are swept by the others, with `leave` events. That heals a
worker killed without running its disconnect handlers.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from chat import protocol
from chat.broadcast import broadcast_room
from chat.models import Connection, Room, Worker

logger = logging.getLogger(__name__)

# Names this worker process (shown by the admin); the random part keeps a
# restarted process that reuses a pid from inheriting a dead one's sockets.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class TooManyConnections(Exception):
    """The user, or the client address, already has the allowed number of sockets."""


# ---------------------------------------------------------------------------
# Worker leases
# ---------------------------------------------------------------------------


def _lease_cutoff():
    return timezone.now() - timedelta(seconds=settings.CHAT_WORKER_LEASE_SECONDS)


def live_worker_ids() -> QuerySet:
    """Returns (as a subquery) the ids of workers whose lease has not run out."""
    return Worker.objects.filter(heartbeat_at__gte=_lease_cutoff()).values("id")


def live_connections() -> QuerySet:
    """Returns the sockets held by live workers: the ones that count as online."""
    return Connection.objects.filter(worker__in=live_worker_ids())


class _Lease:
    """This process's lease: whether it has held one, and whether it was taken.

    Set on the database thread, read on the event loop: under a lock, so that
    a taking noted while the loop reads is not cleared unseen.
    """

    lock = threading.Lock()
    held = False
    taken = False


def worker_heartbeat(
    *,
    worker_id: str = WORKER_ID,
    queue_figures: dict[str, tuple[int, int]] | None = None,
    slow_closes: int | None = None,
) -> None:
    """Renews this worker's lease (creating it on the first call).

    A lease row that is gone after this process held one was swept by a live
    peer (this worker stalled past its lease): its sockets' rows went with it,
    and lease_taken() says so, once.

    Also stores, for the admin, the queue figures (channel -> (queued, peak))
    of sockets that changed and the worker's count of slow closes.
    """
    now = timezone.now()
    fields = {"heartbeat_at": now}
    if slow_closes is not None:
        fields["slow_closes"] = slow_closes
    updated = Worker.objects.filter(id=worker_id).update(**fields)
    created = False
    if not updated:
        _, created = Worker.objects.get_or_create(id=worker_id, defaults=fields)
    if worker_id == WORKER_ID:
        with _Lease.lock:
            if created and _Lease.held:
                _Lease.taken = True
            _Lease.held = True
    for channel_name, (queued, peak) in (queue_figures or {}).items():
        Connection.objects.filter(channel_name=channel_name).update(
            queued_events=queued, peak_queued_events=peak
        )


def worker_stopping(*, worker_id: str = WORKER_ID) -> None:
    """Marks this worker as draining: its sockets stop counting toward the
    caps (see Worker.stopping), so that its users are not refused with 4429
    as they reconnect elsewhere."""
    Worker.objects.filter(id=worker_id).update(stopping=True)


def lease_taken() -> bool:
    """True (once) when this worker's lease was swept since the last call."""
    with _Lease.lock:
        taken, _Lease.taken = _Lease.taken, False
    return taken


def lease_forget() -> None:
    """Forgets that this process held a lease (a test's database starts empty)."""
    with _Lease.lock:
        _Lease.held = _Lease.taken = False


def workers_sweep() -> int:
    """Forgets every socket of a worker whose lease ran out; returns how many.

    Each socket goes as if it had closed, so a user with no socket left
    elsewhere gets a `leave`. A handful of queries however many sockets the
    dead worker held (a worker's thousands must not hold up the database
    thread that every handshake waits on). Safe to run from several workers
    at once.
    """
    with transaction.atomic():
        # The lease rows go first, in the same transaction as their sockets:
        # a stalled worker that wakes up now either renews in time (and keeps
        # both) or finds its row gone (and knows its sockets were swept).
        cutoff = _lease_cutoff()
        dead_workers = list(
            Worker.objects.filter(heartbeat_at__lt=cutoff).values_list("id", flat=True)
        )
        if dead_workers:
            # Still past the lease as it is deleted: a renewal in between wins.
            Worker.objects.filter(id__in=dead_workers, heartbeat_at__lt=cutoff).delete()
        # Rows of a worker with no lease row at all are dead too.
        stale = Connection.objects.filter(~Q(worker__in=Worker.objects.values("id")))
        rows = list(
            stale.values_list("room_id", "user_id", "room__slug", "user__username")
        )
        if rows:
            stale.delete()
            gone = {(room, user): (slug, name) for room, user, slug, name in rows}
            still_here = set(
                live_connections()
                .filter(
                    room_id__in={room for room, _ in gone},
                    user_id__in={user for _, user in gone},
                )
                .values_list("room_id", "user_id")
            )
            for pair, (slug, name) in gone.items():
                if pair not in still_here:
                    transaction.on_commit(
                        lambda slug=slug, name=name: diffs.note(slug, name)
                    )
    # No group_discard for the dead sockets: with the hub their channels were
    # never in a layer group (their worker's was, until the group expiry), and
    # the pub/sub layer's subscriptions died with the process.
    if rows or dead_workers:
        logger.info(
            "swept %d socket(s) of dead worker(s) %s",
            len(rows),
            ", ".join(dead_workers),
        )
    return len(rows)


# ---------------------------------------------------------------------------
# Sockets and members
# ---------------------------------------------------------------------------


def room_members(
    *, room: Room, after: str | None = None, limit: int | None = None
) -> tuple[list[str], bool]:
    """Returns a page of the room's online usernames, sorted, and whether more follow.

    Online: at least one live socket. The page starts after `after`.
    """
    names = (
        live_connections()
        .filter(room=room)
        .order_by("user__username")
        .values_list("user__username", flat=True)
        .distinct()
    )
    if after is not None:
        names = names.filter(user__username__gt=after)
    if limit is None:
        return list(names), False
    page = list(names[: limit + 1])
    return page[:limit], len(page) > limit


def user_socket_count(*, user: AbstractBaseUser) -> int:
    """Returns how many live sockets the user has open, in all rooms."""
    return live_connections().filter(user=user).count()


def room_member_count(*, room: Room) -> int:
    """Returns how many users are online in the room."""
    return live_connections().filter(room=room).values("user").distinct().count()


def client_network(address: str) -> str:
    """Returns what the per-address cap counts a client address as.

    An IPv4 address as it is; an IPv6 one as its /64, which one client (one
    home, one phone) usually holds whole: counted address by address, it
    could open sockets without end.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class SocketOpening:
    """One socket to record as open."""

    room: Room
    user: AbstractBaseUser
    channel_name: str
    address: str = ""


def connection_open(
    *,
    room: Room,
    user: AbstractBaseUser,
    channel_name: str,
    address: str = "",
    max_per_user: int,
) -> bool:
    """Records an open socket; returns True when it is the user's first in the room.

    Raises TooManyConnections when the user already has `max_per_user` sockets.
    A first socket puts the user into the room's next presence diff.
    """
    (result,) = connections_open(
        [SocketOpening(room, user, channel_name, address)], max_per_user=max_per_user
    )
    if isinstance(result, Exception):
        raise result
    return result


def connections_open(
    openings: list[SocketOpening], *, max_per_user: int, max_per_address: int = 0
) -> list[bool | TooManyConnections | Room.DoesNotExist]:
    """Records sockets that open together, in one transaction.

    For each, in order: True when it is its user's first socket in the room
    (the user then goes into the room's next presence diff), False when not,
    or the refusal (an exception, not raised): TooManyConnections when its
    user has `max_per_user` sockets counting the ones before it here, or its
    client address (its /64 for IPv6: client_network) has `max_per_address`
    (0: no cap) on every worker together,
    or Room.DoesNotExist when its room went away. The same handful of queries
    for one socket or a hundred.
    """
    results: list[bool | TooManyConnections | Room.DoesNotExist] = []
    with transaction.atomic():
        # Locking the room rows serialises open/close in a room, so two tabs
        # opening at once on two workers cannot both count as the first.
        locked = {
            room.pk: room
            for room in Room.objects.select_for_update()
            .filter(pk__in={o.room.pk for o in openings})
            .order_by("pk")
        }
        # The sockets count only while this worker's lease row exists.
        worker_heartbeat()
        # One read for both caps: the sockets of these users, and those of
        # these client addresses on every live worker.
        users = {o.user.pk for o in openings}
        capped = max_per_address > 0
        networks = (
            {client_network(o.address) for o in openings if o.address}
            if capped
            else set()
        )
        held = (
            Q(user__in=users) | Q(network__in=networks)
            if networks
            else Q(user__in=users)
        )
        sockets_of: dict[int, int] = {}
        from_network: dict[str, int] = {}
        online: set[tuple[int, int]] = set()
        # A draining worker's sockets keep their users online (no join is
        # sent for a user who never left) but are not counted.
        draining = Worker.objects.filter(id=OuterRef("worker"), stopping=True)
        for user_id, room_id, network, counted in (
            live_connections()
            .filter(held)
            .annotate(counted=~Exists(draining))
            .values_list("user_id", "room_id", "network", "counted")
        ):
            if user_id in users:
                sockets_of[user_id] = sockets_of.get(user_id, 0) + counted
                online.add((user_id, room_id))
            if network in networks and counted:
                from_network[network] = from_network.get(network, 0) + 1
        rows, firsts = [], []
        for opening in openings:
            room, user = locked.get(opening.room.pk), opening.user
            if room is None:
                results.append(Room.DoesNotExist(opening.room.slug))
                continue
            if sockets_of.get(user.pk, 0) >= max_per_user:
                results.append(TooManyConnections(user.get_username()))
                continue
            address = opening.address[:100]
            network = client_network(address)
            if capped and network and from_network.get(network, 0) >= max_per_address:
                results.append(TooManyConnections(network))
                continue
            sockets_of[user.pk] = sockets_of.get(user.pk, 0) + 1
            if capped and network:
                from_network[network] = from_network.get(network, 0) + 1
            first = (user.pk, room.pk) not in online
            online.add((user.pk, room.pk))
            rows.append(
                Connection(
                    room=room,
                    user=user,
                    channel_name=opening.channel_name,
                    worker=WORKER_ID,
                    address=address,
                    network=network,
                )
            )
            if first:
                firsts.append((room.slug, user.get_username()))
            results.append(first)
        Connection.objects.bulk_create(rows)
        if firsts:
            transaction.on_commit(
                lambda: [diffs.note(slug, name) for slug, name in firsts]
            )
    return results


def connection_close(*, channel_name: str) -> bool:
    """Forgets a socket; returns True when it was its user's last one in the room."""
    with transaction.atomic():
        connection = (
            Connection.objects.select_related("user", "room")
            .filter(channel_name=channel_name)
            .first()
        )
        if connection is None:
            return False
        locked = Room.objects.select_for_update().get(pk=connection.room_id)
        # Deleting by channel name: a concurrent sweep may have taken it already.
        deleted, _ = Connection.objects.filter(channel_name=channel_name).delete()
        if not deleted:
            return False
        last = not live_connections().filter(room=locked, user=connection.user).exists()
        if last:
            username = connection.user.get_username()
            transaction.on_commit(lambda: diffs.note(locked.slug, username))
    return last


# ---------------------------------------------------------------------------
# Presence diffs
# ---------------------------------------------------------------------------


def room_presence_diff(
    *, slug: str, usernames: set[str]
) -> protocol.PresenceEvent | None:
    """Returns the `presence` event for users whose presence in a room changed.

    Each user is reported as they are now (joined if online, else left), so
    diffs from two workers that arrive out of order still end in the truth.
    """
    room = Room.objects.filter(slug=slug).first()
    if room is None:
        return None
    online = set(
        live_connections()
        .filter(room=room, user__username__in=usernames)
        .values_list("user__username", flat=True)
    )
    return protocol.event_presence(
        joins=sorted(usernames & online),
        leaves=sorted(usernames - online),
        members=room_member_count(room=room),
    )


class PresenceDiffs:
    """Joins and leaves of this process, sent as one diff per room per interval.

    Phoenix Presence's presence_diff is the model: filling a room of N people
    then costs each socket a frame per interval, not one per person (N²/2).
    Sync code (presence writes in a database thread) notes changes; the flush
    runs on the worker's event loop. Without a loop (a management command, the
    admin under WSGI) a note is flushed at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, set[str]] = {}
        self._loop = None
        self._scheduled = False

    def bind(self, loop) -> None:
        """Called on connect: flushes run on this event loop from now on."""
        with self._lock:
            if loop is self._loop:
                return
            self._loop = loop
            self._scheduled = False
            pending = bool(self._pending)
        if pending:
            self._schedule()

    def note(self, slug: str, username: str) -> None:
        """Puts a user whose presence in room `slug` changed into the next diff."""
        with self._lock:
            self._pending.setdefault(slug, set()).add(username)
        self._schedule()

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self._loop = None
            self._scheduled = False

    def _schedule(self) -> None:
        with self._lock:
            loop = self._loop
            if self._scheduled:
                return
            if loop is not None and not loop.is_closed():
                self._scheduled = True
        if self._scheduled:
            try:
                # A fresh context: the caller's (a database thread's) would make
                # the flush's own database call think it is nested in it.
                loop.call_soon_threadsafe(
                    self._arm, loop, context=contextvars.Context()
                )
                return
            except RuntimeError:
                with self._lock:
                    self._scheduled = False
        self.flush_now()

    def _arm(self, loop) -> None:
        delay = settings.CHAT_PRESENCE_INTERVAL_MS / 1000
        loop.call_later(delay, lambda: loop.create_task(self._flush_async()))

    def _take(self) -> dict[str, set[str]]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._scheduled = False
        return pending

    async def _flush_async(self) -> None:
        from channels.db import database_sync_to_async

        from chat.broadcast import broadcast_room_async

        for slug, usernames in self._take().items():
            try:
                event = await database_sync_to_async(room_presence_diff)(
                    slug=slug, usernames=usernames
                )
                if event is not None:
                    await broadcast_room_async(slug, event)
            except Exception:
                # Presence is best effort while Redis or the database is away;
                # `welcome` and the next diff carry the truth again.
                logger.warning(
                    "could not send the presence diff of %s", slug, exc_info=True
                )

    def flush_now(self) -> None:
        """Sends every pending diff at once (sync code with no event loop)."""
        for slug, usernames in self._take().items():
            try:
                event = room_presence_diff(slug=slug, usernames=usernames)
                if event is not None:
                    broadcast_room(slug, event)
            except Exception:
                logger.warning(
                    "could not send the presence diff of %s", slug, exc_info=True
                )


diffs = PresenceDiffs()
