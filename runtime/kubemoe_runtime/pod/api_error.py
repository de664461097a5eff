"""An error answered in OpenAI's shape (`ApiError`: its status, body and Retry-After header), for the client
to see what it caused or when to retry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error the client caused or should retry, answered in OpenAI's shape. `retry_after` (seconds): a
    refusal worth retrying soon (busy, loading, no backend yet) says when, as a Retry-After header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.detail).model_dump()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
