"""Reading an image out of a prediction request: size limits, multipart, JSON base64, raw bytes.

The size limit is enforced twice: a declared ``Content-Length`` over the limit is refused before
the body reaches the app, and the body is counted while it streams in, so a chunked or lying
client cannot get past it either. A client that stops sending its body mid-way gets HTTP 408.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Header values made only of plain parameters (bare tokens or quoted strings without escapes,
# spaces and tabs around them) are split with one regular expression, several times faster than
# the general parser, which still reads anything else (escapes, RFC 2231 ``name*=``, other
# whitespace). Each part of the pattern can match a character in one way only, so its time is
# linear in the value's length whatever the value.
_PLAIN_VALUE = re.compile(r'[^;"\\]*(?:;[ \t]*[\w.-]+=(?:"[^"\\]*"|[^;"\s]*)[ \t]*)*(?:;[ \t]*)?')
_PLAIN_PARAMETER = re.compile(r';[ \t]*([\w.-]+)=(?:"([^"\\]*)"|([^;"\s]*))')
# The most bytes of headers one multipart part may carry (browsers send about 100).
MAX_PART_HEADER_BYTES = 8192
SOURCES = ("upload", "canvas")
DEFAULT_TOP_K = 5
# Dropped from base64 before it is decoded: GNU base64 and MIME wrap lines at 76 columns.
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
# The most characters of a refused Content-Type quoted back in the error.
_QUOTED_TYPE_LENGTH = 100
# Room for multipart boundaries and the small form fields next to the file.
_MULTIPART_OVERHEAD = 64 * 1024
# When refusing a body over the limit, read and drop the rest of it for up to this long before
# closing: a server that closes with unread bytes makes the kernel reset the connection, and the
# client can lose the 413. The drain is bounded in time and in bytes (the larger of the upload
# limit and _DRAIN_BYTES); past either bound the connection is closed anyway.
_DRAIN_SECONDS = 5.0
_DRAIN_BYTES = 64 * 1024 * 1024
# A request whose body stops arriving for this long gets HTTP 408: until then it holds one of
# the server's in-flight places (see cnnkit.web.limits).
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


@dataclass(frozen=True)
class ImageRequest:
    """The parts of a prediction request: encoded image bytes, where they came from, and top-k."""

    data: bytes
    source: str = "upload"
    top_k: int = DEFAULT_TOP_K


def media_type(headers: Any) -> str:
    """The bare media type of a request (``"application/json"``), lower case."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def body_limit(content_type: str, max_upload_bytes: int) -> int:
    """The most body bytes to accept for an image of at most ``max_upload_bytes``."""
    if content_type == "application/json":
        # Base64 turns 3 bytes into 4; a data-URL prefix and the other fields need a little more.
        return -(-max_upload_bytes // 3) * 4 + _MULTIPART_OVERHEAD
    if content_type == "multipart/form-data":
        return max_upload_bytes + _MULTIPART_OVERHEAD
    return max_upload_bytes


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
        self.drain_bytes = max(max_upload_bytes, _DRAIN_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
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
        # A client waiting for "100 Continue" has sent no body; any other is sending it now, and
        # gets the answer at once while the server reads the body (a client that reads the
        # answer and hangs up ends the drain).
        if headers.get("expect", "").lower() == "100-continue":
            await send_json_error(send, 413, message)
            return

        async def drain() -> None:
            await _drain(receive, min(int(declared), self.drain_bytes))

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


def parse_top_k(value: Any) -> int:
    """A positive integer from a form string or JSON number; raises HTTP 400 otherwise."""
    if value is None or value == "":
        return DEFAULT_TOP_K
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise HTTPException(400, "top_k must be a positive integer")
    try:
        top_k = int(value)
    except ValueError:
        raise HTTPException(400, "top_k must be a positive integer") from None
    if top_k < 1:
        raise HTTPException(400, "top_k must be a positive integer")
    return top_k


def parse_source(value: Any) -> str:
    """``"upload"`` (the default) or ``"canvas"``; raises HTTP 400 otherwise."""
    if value is None or value == "":
        return "upload"
    if value not in SOURCES:
        raise HTTPException(400, f"source must be one of {', '.join(SOURCES)}")
    return value


def decode_base64_image(text: Any, max_upload_bytes: int) -> bytes:
    """Bytes of a base64 string or ``data:image/...;base64,`` URL; HTTP 400/413 on bad input.

    ASCII whitespace (line breaks such as those of ``base64``'s 76-column output) is ignored;
    any other character outside the base64 alphabet is refused.
    """
    if not isinstance(text, str) or not text:
        raise HTTPException(400, "'image' must be a base64 string or a data URL")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise HTTPException(400, "the data URL must be base64-encoded")
    try:
        # Non-ASCII text is no base64 (UnicodeEncodeError is a ValueError).
        encoded = text.encode("ascii").translate(None, _ASCII_WHITESPACE)
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "'image' is not valid base64") from None
    if len(data) > max_upload_bytes:
        raise RequestTooLargeError(max_upload_bytes)
    return data


def parse_multipart(body: bytes, content_type: str, max_fields: int = 16) -> dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body, by name (the first of a repeated name wins).

    The body is already in memory (and within the size limit), so a few ``bytes.find`` calls
    split it much faster than a general streaming parser.

    Args:
        body: the request body.
        content_type: the ``Content-Type`` header, which carries the boundary.
        max_fields: the most parts accepted.

    Raises:
        HTTPException: 400 for a missing boundary or a malformed or truncated body.
    """
    boundary = _boundary(content_type)
    if not 1 <= len(boundary) <= 200:
        raise HTTPException(400, "multipart request without a valid boundary")
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    if position < 0:
        raise HTTPException(400, "malformed multipart body: no boundary found")
    position += len(delimiter)
    fields: dict[str, bytes] = {}
    while not body.startswith(b"--", position):
        if not body.startswith(b"\r\n", position):
            raise HTTPException(400, "malformed multipart body")
        end = body.find(b"\r\n" + delimiter, position)
        header_end = body.find(b"\r\n\r\n", position)
        if end < 0 or header_end < 0 or header_end > end:
            raise HTTPException(400, "malformed or truncated multipart body")
        if len(fields) >= max_fields:
            raise HTTPException(400, f"too many multipart fields (at most {max_fields})")
        if header_end - position > MAX_PART_HEADER_BYTES:
            raise HTTPException(
                400, f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES:,} bytes"
            )
        name = _part_name(body[position + 2 : header_end])
        fields.setdefault(name, body[header_end + 4 : end])
        position = end + 2 + len(delimiter)
    return fields


def _header_options(value: str) -> dict[bytes, bytes]:
    """The parameters of a header value such as ``form-data; name="file"``, by lower-case name."""
    if _PLAIN_VALUE.fullmatch(value):
        return {
            name.lower().encode("latin-1"): (quoted or bare or "").encode("latin-1")
            for name, quoted, bare in _PLAIN_PARAMETER.findall(value)
        }
    return parse_options_header(value)[1]


def _boundary(content_type: str) -> bytes:
    return _header_options(content_type).get(b"boundary", b"")


def _part_name(header_block: bytes) -> str:
    for line in header_block.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            options = _header_options(value.strip())
            if b"name" in options:
                return options[b"name"].decode("utf-8", "replace")
    raise HTTPException(400, "malformed multipart body: a part has no field name")


async def _read_multipart(request: Request, max_upload_bytes: int) -> ImageRequest:
    fields = parse_multipart(await request.body(), request.headers.get("content-type", ""))
    if "file" not in fields:
        raise HTTPException(400, "send the image as a multipart file field named 'file'")
    if len(fields["file"]) > max_upload_bytes:
        raise RequestTooLargeError(max_upload_bytes)

    def text(name: str) -> str | None:
        value = fields.get(name)
        return None if value is None else value.decode("utf-8", "replace").strip()

    return ImageRequest(
        fields["file"],
        parse_source(_field_or_query(request, "source", text("source"))),
        parse_top_k(_field_or_query(request, "top_k", text("top_k"))),
    )


async def _read_json(request: Request, max_upload_bytes: int) -> ImageRequest:
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty request body: send an image")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise HTTPException(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError:  # Python refuses to read integers of over 4,300 digits.
        raise HTTPException(
            400, "the request body is not valid JSON: a number has too many digits"
        ) from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise HTTPException(400, "the JSON body must be an object with an 'image' field")
    return ImageRequest(
        decode_base64_image(payload["image"], max_upload_bytes),
        parse_source(_field_or_query(request, "source", payload.get("source"))),
        parse_top_k(_field_or_query(request, "top_k", payload.get("top_k"))),
    )


def _field_or_query(request: Request, name: str, value: Any) -> Any:
    """A body field's ``value``, or the query parameter ``name`` where the body has none (or an
    empty one): ``?top_k=3`` works with every form of request, and a body field wins."""
    if value is None or (isinstance(value, str) and not value):
        return request.query_params.get(name)
    return value


async def read_image_request(request: Request, max_upload_bytes: int) -> ImageRequest:
    """Parse a prediction request; raises ``HTTPException`` (400, 413 or 415) with a message.

    Accepts ``multipart/form-data`` (fields ``file``, ``source``, ``top_k``), a JSON object
    (``image`` as base64 or a data URL, ``source``, ``top_k``), or raw ``image/*`` bytes.
    ``source`` and ``top_k`` may also be query parameters, with any of the three; where both the
    body and the query give one, the body's field wins.
    """
    content_type = media_type(request.headers)
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_upload_bytes)
    if content_type == "application/json":
        return await _read_json(request, max_upload_bytes)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return ImageRequest(
            await request.body(),
            parse_source(request.query_params.get("source")),
            parse_top_k(request.query_params.get("top_k")),
        )
    if not content_type and not await request.body():
        raise HTTPException(400, "empty request body: send an image")
    raise HTTPException(415, unsupported_type_message(content_type))


def unsupported_type_message(content_type: str) -> str:
    """What to send instead of a body of ``content_type``, naming the type received (``curl -d``
    sends a JSON body as ``application/x-www-form-urlencoded`` unless told otherwise)."""
    received = (
        f"got Content-Type: {content_type[:_QUOTED_TYPE_LENGTH]}"
        if content_type
        else "got no Content-Type"
    )
    return (
        "send multipart/form-data (field 'file'), a JSON body with Content-Type: "
        f"application/json, or raw image/* bytes; {received}"
    )
