"""Reading an image out of a prediction request: multipart, JSON base64 or raw bytes, with
``source`` and ``top_k``; the body's size and time limits are in :mod:`cnnkit.web.limits`."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from cnnkit.web.limits import RequestTooLargeError, media_type

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


@dataclass(frozen=True)
class ImageRequest:
    """The parts of a prediction request: encoded image bytes, where they came from, and top-k."""

    data: bytes
    source: str = "upload"
    top_k: int = DEFAULT_TOP_K


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
    if text[:5].lower() == "data:":  # URL schemes and the base64 marker ignore case.
        header, _, text = text.partition(",")
        if not header.lower().endswith(";base64"):
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
