"""Channel layer and cache configuration from REDIS_URL or REDIS_SENTINELS (no
Redis needed)."""

from __future__ import annotations

import pytest
import redis.asyncio.sentinel
import redis.sentinel
from channels_redis.core import RedisChannelLayer
from channels_redis.utils import create_pool, decode_hosts
from django.core.cache.backends.redis import RedisCacheClient
from django.core.exceptions import ImproperlyConfigured

from chatproject.settings import caches_from_env, channel_layers_from_env, env_float

IN_MEMORY = {"default": {"BACKEND": "chat.hub.InMemoryHubLayer"}}


def redis_hosts(redis_url: str) -> list[dict]:
    layers = channel_layers_from_env(redis_url)
    assert layers["default"]["BACKEND"] == "chat.hub.RedisHubLayer"
    return layers["default"]["CONFIG"]["hosts"]


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch) -> None:
    for name in (
        "CHAT_REDIS_SOCKET_TIMEOUT",
        "CHAT_REDIS_MAX_CONNECTIONS",
        "CHAT_REDIS_LAYER",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("redis_url", [None, "", "   "])
def test_no_redis_url_means_the_in_memory_layer(redis_url):
    assert channel_layers_from_env(redis_url) == IN_MEMORY


def test_one_url_is_one_redis_host():
    hosts = redis_hosts("redis://127.0.0.1:6379/0")
    assert [host["address"] for host in hosts] == ["redis://127.0.0.1:6379/0"]


def test_comma_separated_urls_shard_across_several_hosts():
    hosts = redis_hosts(" redis://a:6379/0, redis://b:6380/1 ,,redis://c:6379/2, ")
    assert [host["address"] for host in hosts] == [
        "redis://a:6379/0",
        "redis://b:6380/1",
        "redis://c:6379/2",
    ]


def test_socket_timeout_is_well_above_channels_redis_5_second_read():
    # redis-py's 5 s default equals the blocking read and drops idle consumers
    # (channels_redis#422).
    for host in redis_hosts("redis://a:6379/0,redis://b:6379/0"):
        timeout = host["socket_timeout"]
        assert timeout is None or timeout > 5


def test_pool_is_sized_above_redis_py_default_of_100():
    (host,) = redis_hosts("redis://a:6379/0")
    assert host["max_connections"] > 100


def test_socket_timeout_and_pool_size_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAT_REDIS_SOCKET_TIMEOUT", "60")
    monkeypatch.setenv("CHAT_REDIS_MAX_CONNECTIONS", "250")
    (host,) = redis_hosts("redis://a:6379/0")
    assert (host["socket_timeout"], host["max_connections"]) == (60, 250)


def test_channels_redis_builds_pools_with_these_settings():
    config = channel_layers_from_env("redis://a:6379/0,redis://b:6380/1")
    layer = RedisChannelLayer(**config["default"]["CONFIG"])
    pools = [layer.create_pool(index) for index in range(layer.ring_size)]
    assert [pool.connection_kwargs["host"] for pool in pools] == ["a", "b"]
    for pool in pools:
        assert pool.connection_kwargs["socket_timeout"] > 5
        assert pool.max_connections > 100


def test_pubsub_layer_is_chosen_by_the_environment_with_the_same_hosts(monkeypatch):
    core = channel_layers_from_env("redis://a:6379/0,redis://b:6380/1")["default"]
    monkeypatch.setenv("CHAT_REDIS_LAYER", "pubsub")
    pubsub = channel_layers_from_env("redis://a:6379/0,redis://b:6380/1")["default"]
    assert pubsub["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert pubsub["CONFIG"]["hosts"] == core["CONFIG"]["hosts"]


def test_pubsub_layer_builds_pools_with_these_settings(monkeypatch):
    # The pub/sub layer hands each host dict to create_pool as it is.
    monkeypatch.setenv("CHAT_REDIS_LAYER", "pubsub")
    config = channel_layers_from_env("redis://a:6379/0")["default"]["CONFIG"]
    (pool,) = [create_pool(host) for host in decode_hosts(config["hosts"])]
    assert pool.connection_kwargs["host"] == "a"
    assert pool.connection_kwargs["socket_timeout"] > 5
    assert pool.max_connections > 100


@pytest.mark.parametrize("value", ["", "core", " Core "])
def test_core_layer_is_the_default(monkeypatch, value):
    monkeypatch.setenv("CHAT_REDIS_LAYER", value)
    assert redis_hosts("redis://a:6379/0")


def test_unknown_redis_layer_fails_loudly(monkeypatch):
    monkeypatch.setenv("CHAT_REDIS_LAYER", "streams")
    with pytest.raises(ImproperlyConfigured, match="CHAT_REDIS_LAYER"):
        channel_layers_from_env("redis://a:6379/0")


def test_the_cache_follows_redis_url():
    assert caches_from_env(None)["default"]["BACKEND"].endswith("LocMemCache")
    assert caches_from_env(" ")["default"]["BACKEND"].endswith("LocMemCache")
    cache = caches_from_env("redis://a:6379/0, redis://b:6379/0")["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert cache["LOCATION"] == "redis://a:6379/0"


SENTINELS = "10.0.0.1:26379, 10.0.0.2:26380,[::1]:26381"


def test_sentinels_find_the_primary_by_its_name_with_the_same_pool_settings():
    layers = channel_layers_from_env(None, SENTINELS, "chat")
    assert layers["default"]["BACKEND"] == "chat.hub.RedisHubLayer"
    (host,) = layers["default"]["CONFIG"]["hosts"]
    assert host["sentinels"] == [
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26380),
        ("::1", 26381),
    ]
    assert host["master_name"] == "chat"
    assert host["socket_timeout"] > 5 and host["max_connections"] > 100
    # A sentinel that does not answer is skipped quickly, not after 30 s.
    assert host["sentinel_kwargs"]["socket_timeout"] <= 5


def test_sentinel_master_name_defaults_to_sentinels_usual_one():
    (host,) = channel_layers_from_env(None, SENTINELS)["default"]["CONFIG"]["hosts"]
    assert host["master_name"] == "mymaster"


def test_several_sentinel_master_names_shard_the_layer():
    hosts = channel_layers_from_env(None, SENTINELS, "chat-a, chat-b")["default"][
        "CONFIG"
    ]["hosts"]
    assert [host["master_name"] for host in hosts] == ["chat-a", "chat-b"]


def test_channels_redis_builds_sentinel_pools_from_these_settings():
    config = channel_layers_from_env(None, SENTINELS, "chat")["default"]["CONFIG"]
    layer = RedisChannelLayer(**config)
    pool = layer.create_pool(0)
    assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool)
    assert pool.service_name == "chat"
    assert pool.connection_kwargs["socket_timeout"] > 5
    assert pool.max_connections > 100
    # Each sentinel is asked once: redis-py's default is ten tries with backoff.
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.get_retry() is None


@pytest.mark.parametrize(
    "sentinels", ["10.0.0.1", "10.0.0.1:port", ":26379", " , ", "a:1,b"]
)
def test_a_malformed_sentinel_list_fails_loudly(sentinels):
    with pytest.raises(ImproperlyConfigured, match="REDIS_SENTINELS"):
        channel_layers_from_env(None, sentinels)


def test_a_sentinel_master_name_without_sentinels_fails_loudly():
    with pytest.raises(ImproperlyConfigured, match="REDIS_SENTINELS"):
        channel_layers_from_env(None, None, "chat")


def test_redis_url_and_sentinels_together_fail_loudly():
    with pytest.raises(ImproperlyConfigured, match="not both"):
        channel_layers_from_env("redis://a:6379/0", SENTINELS)
    with pytest.raises(ImproperlyConfigured, match="not both"):
        caches_from_env("redis://a:6379/0", SENTINELS)


def test_the_cache_asks_the_sentinels_too():
    cache = caches_from_env(None, SENTINELS, "chat")["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    # Django's own client builds the pool (no connection is made yet).
    client = RedisCacheClient([cache["LOCATION"]], **cache["OPTIONS"])
    pool = client._get_connection_pool(write=True)
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "chat"
    assert pool.connection_kwargs["socket_timeout"] == 2
    assert [
        sentinel.connection_pool.connection_kwargs["port"]
        for sentinel in pool.sentinel_manager.sentinels
    ] == [26379, 26380, 26381]
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.get_retry() is None


def test_a_number_setting_takes_fractions_and_has_its_default(monkeypatch):
    monkeypatch.delenv("CHAT_TEST_SECONDS", raising=False)
    assert env_float("CHAT_TEST_SECONDS", 10) == 10.0
    monkeypatch.setenv("CHAT_TEST_SECONDS", "")
    assert env_float("CHAT_TEST_SECONDS", 10) == 10.0
    monkeypatch.setenv("CHAT_TEST_SECONDS", "2.5")
    assert env_float("CHAT_TEST_SECONDS", 10) == 2.5


def test_a_number_setting_that_is_not_a_number_fails_loudly(monkeypatch):
    monkeypatch.setenv("CHAT_TEST_SECONDS", "ten")
    with pytest.raises(ImproperlyConfigured, match="CHAT_TEST_SECONDS"):
        env_float("CHAT_TEST_SECONDS", 10)
