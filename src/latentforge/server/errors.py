"""The server's error type and A1111's error shape ``{"error", "detail", "body", "errors"}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An HTTP error with a message for the client (``field`` names the request field at fault)."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "RequestError"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_response(status: int, kind: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    body = {"error": kind, "detail": message, "body": "", "errors": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)
