"""Redis behind Sentinel: each new connection asks the sentinels for the
primary, so the chat follows a failover (docs/operations.md). channels_redis
builds its own Sentinel pools; these are for Django's cache and the worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

Address = tuple[str, int]


def parse_sentinels(value: str) -> list[Address]:
    """Returns the (host, port) of each sentinel in "host:port,host:port"."""
    sentinels = []
    for part in (piece.strip() for piece in value.split(",")):
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"a sentinel must be host:port, got {part!r}")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise ValueError("no sentinel given")
    return sentinels


class SentinelCachePool(redis.sentinel.SentinelConnectionPool):
    """A connection pool for Django's RedisCache that asks the sentinels.

    CACHES' OPTIONS carry `sentinels`, `master_name` and `sentinel_kwargs`;
    the LOCATION (which Django requires) only names the service.
    """

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        sentinels: Sequence[Address],
        master_name: str,
        sentinel_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> SentinelCachePool:
        manager = redis.sentinel.Sentinel(
            [tuple(address) for address in sentinels], sentinel_kwargs=sentinel_kwargs
        )
        return cls(master_name, manager, **options)


@asynccontextmanager
async def primary_client(
    host: dict[str, Any], timeout: float
) -> AsyncIterator[redis.asyncio.Redis]:
    """Yields a client of the primary for one channel-layer host entry; closes it.

    A plain entry has an `address` (a redis:// URL); a Sentinel one has
    `sentinels` and `master_name`, and the client asks the sentinels for the
    primary when it connects (MasterNotFoundError, a ConnectionError, if none).
    """
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if "address" in host:
        client = redis.asyncio.from_url(host["address"], **options)
        try:
            yield client
        finally:
            await client.aclose()
        return
    sentinels = redis.asyncio.sentinel.Sentinel(
        [tuple(address) for address in host["sentinels"]],
        sentinel_kwargs={**options, **(host.get("sentinel_kwargs") or {})},
    )
    client = sentinels.master_for(host["master_name"], **options)
    try:
        yield client
    finally:
        await client.aclose()
        await sentinels.aclose()
