"""Settings for the chat, all read from the environment with working defaults.

With nothing set it runs on SQLite and the in-memory channel layer; `DATABASE_URL`
and `REDIS_URL` (or `REDIS_SENTINELS`) move it onto PostgreSQL and Redis without
a code change.
"""

import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from chat.sentinel import parse_sentinels

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Returns the boolean value of an environment variable ("1", "true", "yes")."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    """Returns the integer value of an environment variable, failing loudly."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be an integer, got {value!r}"
        ) from None


def env_float(name: str, default: float) -> float:
    """Returns the number value of an environment variable, failing loudly."""
    value = os.environ.get(name)
    if value is None or value == "":
        return float(default)
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None


def env_list(name: str, default: list[str]) -> list[str]:
    """Returns a comma-separated environment variable as a list of stripped items."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


# Both take the same hosts list; each host's extra keys go to redis-py's pool.
# "core" is channels_redis's layer with the chat's fan-out hub under its group
# API (chat/hub.py): one group member per worker, not per socket. "pubsub" is
# channels_redis's pub/sub layer as it comes (docs/performance.md).
REDIS_LAYER_BACKENDS = {
    "core": "chat.hub.RedisHubLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


# How long a question to a sentinel (where is the primary?) may take before
# the next sentinel is asked. Asked once: redis-py's clients otherwise retry
# ten times with backoff, which makes one dead sentinel cost seconds.
SENTINEL_OPTIONS = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": None}


def redis_servers_from_env(
    redis_url: str | None,
    sentinels: str | None = None,
    sentinel_master: str | None = None,
) -> list[dict]:
    """Returns one entry per Redis primary, [] for none.

    REDIS_URL: {"address": url} for each comma-separated URL. REDIS_SENTINELS
    ("host:port,..."): {"sentinels": [...], "master_name": name} for each
    comma-separated name in REDIS_SENTINEL_MASTER ("mymaster", Sentinel's
    usual name, unless set); several names shard as several URLs do.
    """
    urls = [part.strip() for part in (redis_url or "").split(",") if part.strip()]
    if not (sentinels or "").strip():
        if (sentinel_master or "").strip():
            raise ImproperlyConfigured("REDIS_SENTINEL_MASTER needs REDIS_SENTINELS")
        return [{"address": url} for url in urls]
    if urls:
        raise ImproperlyConfigured("set REDIS_URL or REDIS_SENTINELS, not both")
    try:
        addresses = parse_sentinels(sentinels)
    except ValueError as error:
        raise ImproperlyConfigured(f"REDIS_SENTINELS: {error}") from None
    names = [n.strip() for n in (sentinel_master or "mymaster").split(",") if n.strip()]
    return [
        {
            "sentinels": addresses,
            "master_name": name,
            "sentinel_kwargs": dict(SENTINEL_OPTIONS),
        }
        for name in names
    ]


def channel_layers_from_env(
    redis_url: str | None,
    sentinels: str | None = None,
    sentinel_master: str | None = None,
) -> dict:
    """Returns CHANNEL_LAYERS: in-memory without Redis, channels_redis with it.

    A comma-separated REDIS_URL shards the layer across several Redis servers;
    REDIS_SENTINELS finds the primary through Sentinel instead (channels_redis
    asks the sentinels on each new connection). CHAT_REDIS_LAYER picks
    channels_redis's list-based (core) or pub/sub layer.
    """
    servers = redis_servers_from_env(redis_url, sentinels, sentinel_master)
    if not servers:
        return {"default": {"BACKEND": "chat.hub.InMemoryHubLayer"}}
    kind = os.environ.get("CHAT_REDIS_LAYER", "").strip().lower() or "core"
    if kind not in REDIS_LAYER_BACKENDS:
        raise ImproperlyConfigured(
            f"CHAT_REDIS_LAYER must be one of {', '.join(REDIS_LAYER_BACKENDS)}, "
            f"got {kind!r}"
        )
    hosts = [
        {
            **server,
            # redis-py defaults to a 5 s socket timeout, the same as channels_redis's
            # blocking read, which drops idle consumers (channels_redis#422).
            "socket_timeout": env_int("CHAT_REDIS_SOCKET_TIMEOUT", 30),
            # redis-py caps a pool at 100 connections; a burst of disconnects then
            # fails group_discard and leaves ghosts in the group.
            "max_connections": env_int("CHAT_REDIS_MAX_CONNECTIONS", 1000),
        }
        for server in servers
    ]
    config: dict = {"hosts": hosts}
    if kind == "core":
        # A worker's channels share one Redis list: with the hub every broadcast
        # to a room is one entry in it, so a burst needs room (default 100).
        config["capacity"] = env_int("CHAT_LAYER_CAPACITY", 1000)
        # Redis forgets a group not joined again within this; the worker loop
        # rejoins its groups at half of it (chat.checks says how short is too
        # short).
        config["group_expiry"] = env_int("CHAT_LAYER_GROUP_EXPIRY", 86400)
    return {"default": {"BACKEND": REDIS_LAYER_BACKENDS[kind], "CONFIG": config}}


def caches_from_env(
    redis_url: str | None,
    sentinels: str | None = None,
    sentinel_master: str | None = None,
) -> dict:
    """Returns CACHES: per-process LocMem without Redis, the first Redis with it."""
    servers = redis_servers_from_env(redis_url, sentinels, sentinel_master)
    if not servers:
        return {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    first = servers[0]
    # A rate-limit check must not hang a request while Redis is away.
    options: dict = {"socket_connect_timeout": 2, "socket_timeout": 2}
    if "address" in first:
        location = first["address"]
    else:
        # Django wants a LOCATION; the pool finds the primary from the rest.
        location = f"sentinel:{first['master_name']}"
        options.update(
            pool_class="chat.sentinel.SentinelCachePool",
            sentinels=first["sentinels"],
            master_name=first["master_name"],
            sentinel_kwargs=first["sentinel_kwargs"],
        )
    return {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": location,
            "KEY_PREFIX": "chat",
            "OPTIONS": options,
        }
    }


# ---------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"

# Behind TLS (nginx terminating HTTPS, X-Forwarded-Proto set): one switch for
# secure cookies, HSTS and the redirect to https. Off by default, since `make
# run` and the tests speak plain HTTP.
HTTPS = env_bool("DJANGO_HTTPS", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    # Preloading is a promise to browsers that is slow to take back: its own
    # switch, and its deploy check is silenced while it is off.
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", False)
    if not SECURE_HSTS_PRELOAD:
        SILENCED_SYSTEM_CHECKS = ["security.W021"]
# Django's defaults, spelled out: nosniff, same-origin referrers, no framing.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # daphne first: its runserver replaces Django's with an ASGI one.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
]

MIDDLEWARE = [
    # First, so that it also sees the answers Django makes before a view runs.
    "chatproject.middleware.api_json_errors",
    "chatproject.middleware.content_security_policy",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from STATIC_ROOT, so a worker with DEBUG off needs no
    # nginx in front for its pages to work (DEBUG: asgi.py serves them).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        # Kept open: every database call of a consumer (channels'
        # database_sync_to_async) would otherwise reconnect, and on SQLite
        # run the PRAGMAs below again.
        conn_max_age=env_int("DJANGO_CONN_MAX_AGE", 600),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # IMMEDIATE takes the write lock when a transaction starts, so the
            # read-then-write of seq and presence cannot interleave on SQLite.
            "transaction_mode": "IMMEDIATE",
            # Seconds a write waits for another process's lock before it
            # fails (a post then gets `unavailable`).
            "timeout": env_int("DJANGO_DB_TIMEOUT", 20),
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests use a file, not :memory:, so the consumer's database thread and the
    # test see one database; one per process so parallel runs do not collide.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get("DJANGO_TEST_SQLITE")
        or os.path.join(tempfile.gettempdir(), f"chat-test-{os.getpid()}.sqlite3")
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ---------------------------------------------------------------------------
# Channel layer
# ---------------------------------------------------------------------------

REDIS_ENV = (
    os.environ.get("REDIS_URL"),
    os.environ.get("REDIS_SENTINELS"),
    os.environ.get("REDIS_SENTINEL_MASTER"),
)
CHANNEL_LAYERS = channel_layers_from_env(*REDIS_ENV)

# The HTTP API's per-token rate counters live in the cache. LocMem is per
# process, right for one worker; with Redis every worker must count together,
# so the cache lives on the first Redis server.
CACHES = caches_from_env(*REDIS_ENV)

# ---------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {
        # The dotted path stays whole, as Django's startproject writes it.
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"  # noqa: E501
    },
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:lobby"
LOGOUT_REDIRECT_URL = "login"

# ---------------------------------------------------------------------------
# Internationalisation, static files
# ---------------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT") or BASE_DIR / "staticfiles")
# collectstatic writes each file also under a name with its content's hash
# (and compressed copies), imports between JavaScript modules rewritten to
# those names; with DEBUG off pages link them, which
# WhiteNoise sends with a ten-year immutable Cache-Control. Pages then need its
# manifest: run `manage.py collectstatic` before a worker with DEBUG off starts.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "chatproject.storage.StaticFilesStorage"},
}

# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {
        "handlers": ["console"],
        "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO"),
    },
}

# ---------------------------------------------------------------------------
# Chat limits (read at call time through django.conf.settings)
# ---------------------------------------------------------------------------

CHAT_MAX_MESSAGE_LENGTH = env_int("CHAT_MAX_MESSAGE_LENGTH", 2000)
CHAT_MAX_FRAME_BYTES = env_int("CHAT_MAX_FRAME_BYTES", 16 * 1024)
CHAT_HISTORY_PAGE = env_int("CHAT_HISTORY_PAGE", 50)
CHAT_HISTORY_MAX = env_int("CHAT_HISTORY_MAX", 200)
CHAT_RESUME_MAX = env_int("CHAT_RESUME_MAX", 500)
CHAT_RATE_MESSAGES = env_int("CHAT_RATE_MESSAGES", 20)
CHAT_RATE_WINDOW_SECONDS = env_int("CHAT_RATE_WINDOW_SECONDS", 10)
CHAT_TYPING_INTERVAL_SECONDS = env_int("CHAT_TYPING_INTERVAL_SECONDS", 2)
# Frames the server refuses (bad JSON, unknown type, invalid fields) per socket
# per minute before it closes the socket with 1008; the page sends none.
CHAT_BAD_FRAMES_PER_MINUTE = env_int("CHAT_BAD_FRAMES_PER_MINUTE", 30)
CHAT_MAX_CONNECTIONS_PER_USER = env_int("CHAT_MAX_CONNECTIONS_PER_USER", 20)
# How long a socket waits for Redis (a join at the handshake, a post's count)
# before it answers `unavailable` and closes with 1013.
CHAT_REDIS_OPERATION_SECONDS = env_int("CHAT_REDIS_OPERATION_SECONDS", 5)
# Open sockets per client address (an IPv6 /64) on all workers together (0: no
# cap); behind a proxy the address is the client's only with --proxy-headers
# (deploy/ has it).
CHAT_MAX_CONNECTIONS_PER_ADDRESS = env_int("CHAT_MAX_CONNECTIONS_PER_ADDRESS", 256)
# HTTP API: request body size, and requests per token per window.
CHAT_API_MAX_BODY_BYTES = env_int("CHAT_API_MAX_BODY_BYTES", 64 * 1024)
CHAT_API_RATE_REQUESTS = env_int("CHAT_API_RATE_REQUESTS", 60)
CHAT_API_RATE_WINDOW_SECONDS = env_int("CHAT_API_RATE_WINDOW_SECONDS", 60)
# A worker renews its lease every third of this; the sockets of a worker whose
# lease ran out are swept (with `leave` events) by the live ones.
CHAT_WORKER_LEASE_SECONDS = env_int("CHAT_WORKER_LEASE_SECONDS", 30)
# On SIGTERM a worker closes its sockets with 1001 and stops once they and
# their handlers are done, or after this many seconds (chatproject/server.py).
CHAT_DRAIN_SECONDS = env_float("CHAT_DRAIN_SECONDS", 10)
# Fan-out: what one socket may have queued before it is closed with 4008 (too
# slow: reconnect and resume), and how long its transport may stay full.
CHAT_SEND_QUEUE_FRAMES = env_int("CHAT_SEND_QUEUE_FRAMES", 1000)
CHAT_SEND_QUEUE_BYTES = env_int("CHAT_SEND_QUEUE_BYTES", 1024 * 1024)
CHAT_SEND_STALL_SECONDS = env_int("CHAT_SEND_STALL_SECONDS", 10)
# Bytes daphne's transport may hold unsent for a socket before its writer waits.
CHAT_SEND_TRANSPORT_BYTES = env_int("CHAT_SEND_TRANSPORT_BYTES", 64 * 1024)
# How long a socket's writer waits for more events before it sends: under load
# the events of several broadcasts then leave in one frame (chat.batch), and a
# busy room costs a write per socket per interval, not per message.
CHAT_SEND_LINGER_MS = env_int("CHAT_SEND_LINGER_MS", 20)
# Presence: joins and leaves in a room go out as one diff per this interval,
# and `welcome` lists at most a page of members (a client asks for more).
CHAT_PRESENCE_INTERVAL_MS = env_int("CHAT_PRESENCE_INTERVAL_MS", 500)
CHAT_MEMBERS_PAGE = env_int("CHAT_MEMBERS_PAGE", 100)
# A socket stores its read position at most this often (the latest one wins).
CHAT_READ_INTERVAL_MS = env_int("CHAT_READ_INTERVAL_MS", 500)
