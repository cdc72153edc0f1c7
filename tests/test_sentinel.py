"""The worker's checks and the cache through a real redis-sentinel (the layer's
own Sentinel pools are channels_redis's; the failover is in test_cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.core.cache.backends.redis import RedisCache

from chat import worker
from chatproject.settings import caches_from_env, channel_layers_from_env
from harness.processes import RedisSentinel, RedisServer, free_port

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Iterator[tuple[RedisServer, RedisSentinel]]:
    """A primary with no replica and one sentinel watching it as "chat"."""
    primary = RedisServer()
    primary.start()
    sentinel = RedisSentinel(
        tmp_path_factory.mktemp("sentinel"), primary.port, master_name="chat", quorum=1
    )
    try:
        sentinel.start()
        yield primary, sentinel
    finally:
        sentinel.stop()
        primary.stop()


def run_id(server: RedisServer) -> str:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        return client.info("server")["run_id"]
    finally:
        client.close()


async def test_the_worker_asks_the_next_sentinel_when_one_is_down(watched, settings):
    primary, sentinel = watched
    nobody = f"127.0.0.1:{free_port()}"
    settings.CHANNEL_LAYERS = channel_layers_from_env(
        None, f"{nobody},{sentinel.address}", "chat"
    )
    assert await worker.redis_run_ids() == (run_id(primary),)


async def test_a_name_no_sentinel_watches_is_unreachable(watched, settings):
    _, sentinel = watched
    settings.CHANNEL_LAYERS = channel_layers_from_env(None, sentinel.address, "other")
    assert await worker.redis_run_ids() is None


async def test_the_worker_check_leaves_no_connection_open(watched, settings):
    primary, sentinel = watched
    settings.CHANNEL_LAYERS = channel_layers_from_env(None, sentinel.address, "chat")
    client = redis.Redis(host="127.0.0.1", port=primary.port)
    try:
        before = client.info("clients")["connected_clients"]
        for _ in range(20):
            assert await worker.redis_run_ids() == (run_id(primary),)
        assert client.info("clients")["connected_clients"] <= before + 1
    finally:
        client.close()


def test_the_cache_writes_to_the_primary_the_sentinel_names(watched):
    primary, sentinel = watched
    config = caches_from_env(None, sentinel.address, "chat")["default"]
    cache = RedisCache(config["LOCATION"], config)
    cache.set("through-sentinel", 7)
    assert cache.get("through-sentinel") == 7
    client = redis.Redis(host="127.0.0.1", port=primary.port)
    try:
        assert client.keys("*through-sentinel")
    finally:
        client.close()
    cache.close()
