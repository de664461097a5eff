"""Reading an API request's body: bounded in bytes (declared or sent), then validated into its model
with an OpenAI-shaped 400 naming the first bad field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from kubemoe_runtime.pod.api_error import ApiError

MAX_BODY_BYTES = 8 * 1024 * 1024
RequestT = TypeVar("RequestT", bound=BaseModel)


async def read_body(request: Request, *, limit: int, param: str | None = None) -> bytes:
    """The request body, or 413 once it exceeds `limit` bytes (declared or sent)."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", param=param)
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return body


async def parse_body(request: Request, model: type[RequestT]) -> RequestT:
    body = await read_body(request, limit=MAX_BODY_BYTES)
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first: Any = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])  # e.g. "messages.0.role"
        param = str(first["loc"][0]) if first["loc"] else None  # OpenAI names the top-level field
        message = first["msg"] if not where else f"{where}: {first['msg']}"
        raise ApiError(400, message, param=param) from err
