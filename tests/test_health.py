"""Liveness, readiness and metrics endpoints."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import db, free_port, post, redis_layer_config

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_touching_anything(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_is_ready_with_the_database_and_in_memory_layer(client, settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    }
    response = client.get("/readyz")
    assert (response.status_code, response.json()["status"]) == (200, "ready")


def test_readyz_is_ready_with_a_live_redis(client, settings, redis_server):
    settings.CHANNEL_LAYERS = {"default": redis_layer_config(redis_server.url)}
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_with_a_reason_when_redis_is_down(client, settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.CHANNEL_LAYERS = {"default": redis_layer_config(dead)}
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "Redis" in response.json()["reason"]


def test_readyz_is_503_when_one_of_two_shards_is_down(client, settings, redis_server):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.CHANNEL_LAYERS = {
        "default": redis_layer_config(f"{redis_server.url},{dead}")
    }
    assert client.get("/readyz").status_code == 503


def test_health_endpoints_refuse_other_methods(client):
    assert client.post("/healthz").status_code == 405
    assert client.post("/readyz").status_code == 405


def scrape(client) -> dict[tuple[str, str | None], float]:
    """Returns {(sample name, code label): value} from /metrics."""
    response = client.get("/metrics")
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, sample.labels.get("code")): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


@pytest.mark.django_db(transaction=True)
async def test_metrics_count_sockets_messages_and_errors(connect, alice, room, client):
    before = await db(scrape, client)
    a, _ = await connect(alice)
    await post(a, "counted")
    await a.send_text("not json")
    await a.receive_type("error")
    after = await db(scrape, client)

    def grew(name: str, code: str | None = None) -> float:
        return after[(name, code)] - before.get((name, code), 0)

    assert grew("chat_open_sockets") == 1
    assert grew("chat_messages_received_total") == 1
    assert grew("chat_frames_sent_total") >= 3  # welcome, message, error
    assert grew("chat_errors_total", "bad_json") == 1
