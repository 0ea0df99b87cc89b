"""Bounding the requests the server works on at once, not the connections it holds open.

uvicorn's own ``limit_concurrency`` counts open connections, idle ones included: 128 browser
keep-alive sockets, or 128 clients that connect and send nothing, made every other request a
503 for as long as they stayed open. This middleware counts requests in progress instead, and
leaves out health checks: a monitor must see a busy server as up, not as failing.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from cnnkit.web.upload import send_json_error


class InFlightLimitMiddleware:
    """ASGI middleware answering 503 (with ``Retry-After``) while ``limit`` requests are running.

    Each running request may hold an upload of up to the size limit, so this bounds memory.

    Args:
        app: the wrapped application.
        limit: the most HTTP requests handled at once.
        exempt_paths: paths whose GET and HEAD requests are neither counted nor turned away
            (cheap answers without a body to wait for, such as a health check).

    Raises:
        ValueError: if ``limit`` is below 1.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt_paths: Iterable[str] = ()) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.app = app
        self.limit = limit
        self.exempt_paths = frozenset(exempt_paths)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_exempt(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await send_json_error(
                send, 503, "the server is busy; retry shortly", [(b"retry-after", b"1")]
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _is_exempt(self, scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in self.exempt_paths
