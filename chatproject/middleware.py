"""The project's middleware: each one a change to every answer, sync or async.

Django runs a middleware in whichever mode its neighbours run; one that only
rewrites the response can be both, and needs no thread hop under ASGI.
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

from chat.api import as_api_error
from chatproject.security import with_policy

Transform = Callable[[HttpRequest, HttpResponse], HttpResponse]


def response_middleware(transform: Transform):
    """Returns a middleware that passes every response through `transform`."""

    @sync_and_async_middleware
    def middleware_factory(get_response):
        if iscoroutinefunction(get_response):

            async def middleware(request: HttpRequest):
                return transform(request, await get_response(request))

        else:

            def middleware(request: HttpRequest):
                return transform(request, get_response(request))

        return middleware

    return middleware_factory


api_json_errors = response_middleware(as_api_error)
content_security_policy = response_middleware(with_policy)
