"""Endpoints for the load balancer and the monitoring: liveness, readiness, metrics."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from chat import metrics, worker
from chat.presence import WORKER_ID

logger = logging.getLogger(__name__)


def _database_answers() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        logger.warning("readiness: the database does not answer", exc_info=True)
        return False


@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves requests. Async, so that it answers while
    the database thread (one per worker) waits on a locked database."""
    return JsonResponse({"status": "ok", "worker": WORKER_ID})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 when the database and the channel layer answer, else 503."""
    problems = []
    if not _database_answers():
        problems.append("database unreachable")
    if async_to_sync(worker.redis_run_ids)() is None:
        problems.append("channel layer (Redis) unreachable")
    if worker.is_draining():
        problems.append("shutting down")
    if problems:
        return JsonResponse(
            {
                "status": "unavailable",
                "reason": "; ".join(problems),
                "worker": WORKER_ID,
            },
            status=503,
        )
    return JsonResponse({"status": "ready", "worker": WORKER_ID})


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of this worker's metrics."""
    return HttpResponse(
        metrics.exposition(), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
