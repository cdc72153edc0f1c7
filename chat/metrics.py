"""Prometheus metrics of one worker process, served at /metrics.

Each worker exposes its own figures with a `worker` label; scrape every worker
directly (not through the load balancer, which would pick one at random).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

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

ERRORS = Counter(
    "chat_errors",
    "Error frames sent, by error code.",
    ["worker", "code"],
    registry=REGISTRY,
)


def error_sent(code: str) -> None:
    ERRORS.labels(worker=WORKER_ID, code=code).inc()


def exposition() -> bytes:
    """Returns the metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
