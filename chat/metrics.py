"""Prometheus metrics of one worker process, served at /metrics.

Each worker exposes its own figures with a `worker` label; scrape every worker
directly (not through the load balancer, which would pick one at random).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from chat.presence import WORKER_ID

REGISTRY = CollectorRegistry(auto_describe=True)

OPEN_SOCKETS = Gauge(
    "chat_open_sockets",
    "WebSockets open on this worker.",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

MESSAGES_RECEIVED = Counter(
    "chat_messages_received",
    "Messages posted by clients of this worker and stored.",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

FRAMES_SENT = Counter(
    "chat_frames_sent",
    "Frames sent to the sockets of this worker (messages, presence, errors, ...).",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

EVENTS_SENT = Counter(
    "chat_events_sent",
    "Events sent to the sockets of this worker (a batch frame holds several).",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

SEND_BATCH_EVENTS = Histogram(
    "chat_send_batch_events",
    "Events a socket's writer found queued and sent at once (queue depth).",
    ["worker"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
).labels(worker=WORKER_ID)

SEND_QUEUE_FRAMES = Gauge(
    "chat_send_queue_frames",
    "Events queued for the sockets of this worker and not yet sent.",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

SLOW_CLOSES = Counter(
    "chat_slow_socket_closes",
    "Sockets closed with 4008 for falling behind, by reason (frames, bytes, stalled).",
    ["worker", "reason"],
    registry=REGISTRY,
)

DROPPED_EVENTS = Counter(
    "chat_dropped_events",
    "Events dropped from the queue of a socket closed for falling behind.",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)

ERRORS = Counter(
    "chat_errors",
    "Error frames sent, by error code.",
    ["worker", "code"],
    registry=REGISTRY,
)


LAYER_DROPS = Counter(
    "chat_layer_dropped_messages",
    "Channel-layer messages Redis refused because a channel was full "
    "(CHAT_LAYER_CAPACITY); the sockets fill the gap from history by seq.",
    ["worker"],
    registry=REGISTRY,
).labels(worker=WORKER_ID)


def error_sent(code: str) -> None:
    ERRORS.labels(worker=WORKER_ID, code=code).inc()


def slow_close(reason: str, dropped: int) -> None:
    SLOW_CLOSES.labels(worker=WORKER_ID, reason=reason).inc()
    DROPPED_EVENTS.inc(dropped)


def exposition() -> bytes:
    """Returns the metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
