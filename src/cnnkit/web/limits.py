"""Bounding what the server takes on: request bodies by size and time, requests by number.

A body's size limit is enforced twice: a declared ``Content-Length`` over the limit is refused
before the body reaches the app, and the body is counted while it streams in, so a chunked or
lying client cannot get past it either. A client that stops sending its body mid-way gets HTTP
408.

uvicorn's own ``limit_concurrency`` counts open connections, idle ones included: 128 browser
keep-alive sockets, or 128 clients that connect and send nothing, made every other request a
503 for as long as they stayed open. :class:`InFlightLimitMiddleware` counts requests in
progress instead, and leaves out health checks: a monitor must see a busy server as up, not as
failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Room for multipart boundaries and the small form fields next to the file.
_MULTIPART_OVERHEAD = 64 * 1024
# When refusing a body over the limit, read and drop the rest of it for up to this long before
# closing: a server that closes with unread bytes makes the kernel reset the connection, and the
# client can lose the 413. The drain is bounded in time and in bytes (the larger of the upload
# limit and _DRAIN_BYTES); past either bound the connection is closed anyway.
_DRAIN_SECONDS = 5.0
_DRAIN_BYTES = 64 * 1024 * 1024
# A request whose body stops arriving for this long gets HTTP 408: until then it holds one of
# the server's in-flight places (see InFlightLimitMiddleware below).
BODY_TIMEOUT_SECONDS = 15.0
# The longest a whole request body may take: a client trickling a byte every few seconds would
# otherwise hold its place for hours. 5 MB in 120 s needs about 42 kB/s.
BODY_DEADLINE_SECONDS = 120.0


class RequestTooLargeError(HTTPException):
    """A request body over the upload limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request too large: images of up to {limit:,} bytes are accepted")


class BodyTimeoutError(HTTPException):
    """A request body that stopped arriving, or took too long in all (HTTP 408); the
    connection is closed."""

    def __init__(self, seconds: float, whole: bool = False) -> None:
        reason = (
            f"the request body took longer than {seconds:g} seconds to arrive"
            if whole
            else f"no part of the request body arrived for {seconds:g} seconds"
        )
        super().__init__(408, f"request timeout: {reason}", {"Connection": "close"})


def media_type(headers: Any) -> str:
    """The bare media type of a request (``"application/json"``), lower case."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def body_limit(content_type: str, max_upload_bytes: int) -> int:
    """The most body bytes to accept for an image of at most ``max_upload_bytes``."""
    if content_type == "application/json":
        # Base64 turns 3 bytes into 4, and line breaks may wrap it (written in JSON as "\r\n":
        # 4 bytes a line of 64 characters, as PEM wraps it; MIME's lines are 76); a data-URL
        # prefix and the other fields need a little more. The decoded image's own size is
        # checked against the limit after.
        encoded = -(-max_upload_bytes // 3) * 4
        return encoded + encoded // 16 + _MULTIPART_OVERHEAD
    if content_type == "multipart/form-data":
        return max_upload_bytes + _MULTIPART_OVERHEAD
    return max_upload_bytes


def drain_bytes(max_upload_bytes: int) -> int:
    """The most bytes of a refused request's body read and dropped before closing: at least
    any body that the upload limit allows (a base64 image in JSON the largest), and at least
    ``_DRAIN_BYTES``."""
    return max(body_limit("application/json", max_upload_bytes), _DRAIN_BYTES)


async def _within(seconds: float, awaitable: Awaitable[Message]) -> Message:
    """``await awaitable``, or :class:`asyncio.TimeoutError` after ``seconds``.

    ``asyncio.timeout`` (Python 3.11) only schedules a cancellation, where ``wait_for`` wraps
    the awaitable in a new task: about 5 against 16 microseconds a body read on the 2-core
    development machine.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class BodySizeLimitMiddleware:
    """ASGI middleware refusing request bodies over the limit (HTTP 413) or stalled (HTTP 408).

    Args:
        app: the wrapped application.
        max_upload_bytes: the largest image accepted (see :func:`body_limit`).
        body_timeout_seconds: the longest wait for the next part of a request body.
        body_deadline_seconds: the longest a whole request body may take to arrive.

    Raises:
        ValueError: if either time is not positive.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_upload_bytes: int,
        body_timeout_seconds: float = BODY_TIMEOUT_SECONDS,
        body_deadline_seconds: float = BODY_DEADLINE_SECONDS,
    ) -> None:
        for name, value in (
            ("body_timeout_seconds", body_timeout_seconds),
            ("body_deadline_seconds", body_deadline_seconds),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value}")
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.body_deadline_seconds = body_deadline_seconds
        self.drain_bytes = drain_bytes(max_upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        limit = body_limit(media_type(headers), self.max_upload_bytes)
        declared = headers.get("content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            await self._refuse_declared(declared.strip(), headers, receive, send)
            return
        received = 0
        body_done = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:  # Past the body only a disconnect can come: no time limit.
                return await receive()
            now = asyncio.get_running_loop().time()
            deadline = deadline or now + self.body_deadline_seconds
            wait = min(self.body_timeout_seconds, deadline - now)
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await _within(wait, receive())
            except asyncio.TimeoutError:
                whole = wait < self.body_timeout_seconds
                seconds = self.body_deadline_seconds if whole else self.body_timeout_seconds
                raise BodyTimeoutError(seconds, whole) from None
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > limit:
                if not body_done:
                    await _drain(receive, self.drain_bytes)
                raise RequestTooLargeError(self.max_upload_bytes)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse_declared(
        self, declared: str, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        """Answer 413 (or 400 for a malformed ``Content-Length``) without running the app."""
        if not declared.isdigit():
            await send_json_error(send, 400, "invalid Content-Length")
            return
        message = RequestTooLargeError(self.max_upload_bytes).detail
        # The client gets the answer at once while the server reads the body (a client that
        # reads the answer and hangs up ends the drain).
        drain = _body_drain(headers, receive, min(int(declared), self.drain_bytes))
        await send_json_error(send, 413, message, before_closing=drain)


async def _drain(receive: Receive, max_bytes: int) -> None:
    """Read and drop the rest of a request body, up to ``max_bytes`` or ``_DRAIN_SECONDS``."""

    async def drain() -> None:
        drained = 0
        while drained < max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), _DRAIN_SECONDS)


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (ASGI gives them lower-cased)."""
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


def _body_drain(
    headers: dict[str, str], receive: Receive, max_bytes: int
) -> Callable[[], Awaitable[None]] | None:
    """What reads and drops up to ``max_bytes`` of the body of a request answered without
    reading it (bounded in time as :func:`_drain` is), so that closing the connection does not
    reset it before the client has the answer; None for a client that waits for
    "100 Continue" and so has sent no body."""
    if headers.get("expect", "").lower() == "100-continue":
        return None

    async def drain() -> None:
        await _drain(receive, max_bytes)

    return drain


def _unread_body_drain(
    scope: Scope, receive: Receive, max_bytes: int
) -> Callable[[], Awaitable[None]] | None:
    """:func:`_body_drain` (of up to ``max_bytes``) for a request answered before the app read
    it; None for one with no body."""
    headers = _headers(scope)
    declared = headers.get("content-length", "").strip()
    if "transfer-encoding" not in headers and (not declared.isdigit() or int(declared) == 0):
        return None
    size = min(int(declared), max_bytes) if declared.isdigit() else max_bytes
    return _body_drain(headers, receive, size)


async def send_json_error(
    send: Send,
    status: int,
    message: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    before_closing: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Send ``{"error": message}`` with ``status`` and close the connection.

    Args:
        send: the ASGI send channel.
        status: the HTTP status.
        message: the error text.
        headers: more response headers.
        before_closing: awaited once the whole answer is sent and before the response ends (the
            server closes the connection then), so a client can read the answer meanwhile.
    """
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    if before_closing is None:
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await before_closing()
    await send({"type": "http.response.body", "body": b""})


class InFlightLimitMiddleware:
    """ASGI middleware answering 503 (with ``Retry-After``) while ``limit`` requests are running.

    Each running request may hold an upload of up to the size limit, so this bounds memory.

    Args:
        app: the wrapped application.
        limit: the most HTTP requests handled at once.
        exempt_paths: paths whose GET and HEAD requests are neither counted nor turned away
            (cheap answers without a body to wait for, such as a health check).
        max_upload_bytes: the upload limit: the body of a request turned away is read up to
            :func:`drain_bytes` of it before the connection closes.

    Raises:
        ValueError: if ``limit`` is below 1.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        exempt_paths: Iterable[str] = (),
        max_upload_bytes: int = _DRAIN_BYTES,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.app = app
        self.limit = limit
        self.exempt_paths = frozenset(exempt_paths)
        self.drain_bytes = drain_bytes(max_upload_bytes)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_exempt(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await send_json_error(
                send,
                503,
                "the server is busy; retry shortly",
                [(b"retry-after", b"1")],
                before_closing=_unread_body_drain(scope, receive, self.drain_bytes),
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _is_exempt(self, scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in self.exempt_paths
