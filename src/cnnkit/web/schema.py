"""What ``/docs`` shows for ``POST /api/predict``: its three request forms and its answers.

The route reads the request itself (multipart, JSON or raw bytes, with a streamed size limit),
so FastAPI cannot infer these; they are declared here for the OpenAPI document only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from cnnkit.web.render import MAX_LATEX_LENGTH


class RankedClass(BaseModel):
    label: str = Field(description="the class name (a LaTeX command for symbols)")
    index: int = Field(description="the class index in the model file")
    confidence: float = Field(ge=0, le=1, description="softmax probability")
    render: str | None = Field(None, description="symbols only: URL of the rendered SVG")


class PredictAnswer(BaseModel):
    predictions: list[RankedClass] = Field(description="the top_k classes, best first")
    model: dict[str, Any] = Field(
        description="architecture, kind, num_classes, input_shape, runtime (pytorch, onnxruntime "
        "or onnxruntime int8)"
    )


class ErrorAnswer(BaseModel):
    error: str = Field(description="what was wrong, in one line")


_SOURCE = {
    "type": "string",
    "enum": ["upload", "canvas"],
    "default": "upload",
    "description": "canvas: a drawing, cropped to its ink and made to look like the training "
    "symbols first. upload: a file; for a symbol model, one of another size than the model's "
    "stored input (32x32 for HASYv2) is cropped to its ink the same way, and one of exactly that "
    "size is used as it is",
}
_TOP_K = {
    "type": "integer",
    "minimum": 1,
    "default": 5,
    "description": "how many classes to return, best first (at most the model's classes)",
}


def _query_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter that stands for the body field ``name``."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": f"as the body field {name}, with any request body (the only way to give "
        "it with raw image bytes); where the body has the field too, the body's value wins",
    }


PREDICT_REQUEST: dict[str, Any] = {
    "parameters": [_query_parameter("source", _SOURCE), _query_parameter("top_k", _TOP_K)],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "source": _SOURCE,
                        "top_k": _TOP_K,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "description": "a base64 PNG or JPEG, or a data: URL; line "
                            "breaks are ignored",
                        },
                        "source": _SOURCE,
                        "top_k": _TOP_K,
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}

PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer, "description": description}
    for status, description in {
        400: "not an image, truncated, a decompression bomb, an empty body or a bad field",
        413: "larger than the upload limit (5 MB unless set)",
        415: "a content type other than multipart, JSON (application/json) or image/*",
        503: "busy: too many requests in flight; try again shortly",
    }.items()
}

# /api/render answers SVG, and its 422 is the JSON error every endpoint sends (not FastAPI's
# default validation schema, which the app's error handler replaces).
RENDER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/svg+xml": {}}, "description": "the symbol as SVG"},
    422: {
        "model": ErrorAnswer,
        "description": f"no `latex`, only whitespace, or over {MAX_LATEX_LENGTH} characters",
    },
    503: {"model": ErrorAnswer, "description": "busy: too many renders at once; retry shortly"},
}
