"""Channel layer and cache configuration from REDIS_URL (no Redis needed)."""

from __future__ import annotations

import pytest
from channels_redis.core import RedisChannelLayer
from channels_redis.utils import create_pool, decode_hosts
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
