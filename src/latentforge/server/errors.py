"""The server's error type, A1111's error shape ``{"error", "detail", "body", "errors"}``, and the guard in
front of every route: HTTP Basic authentication and the request body limit."""

from __future__ import annotations

import base64
import hmac

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


class Guard:
    """ASGI middleware: HTTP Basic authentication (constant-time comparison) and the body size limit."""

    def __init__(self, app, users: list[tuple[str, str]], max_body: int):
        self.app, self.max_body = app, max_body
        self.tokens = [base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in users]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.tokens and scope.get("method") != "OPTIONS":
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[6:].strip() if given[:6].lower() == "basic " else ""
            ok = False
            for t in self.tokens:  # compare with every user, so timing tells nothing
                ok |= hmac.compare_digest(token.encode(), t.encode())
            if not ok:
                resp = error_response(
                    401, "Unauthorized", "authentication required: HTTP Basic with a user of --api-auth"
                )
                resp.headers["WWW-Authenticate"] = 'Basic realm="latentforge"'
                return await resp(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            resp = error_response(
                413, "PayloadTooLarge", f"the request body is over the limit of {self.max_body} bytes"
            )
            return await resp(scope, receive, send)
        # read the whole body first (chunked uploads have no length), refusing it past the limit
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                message = f"the request body is over the limit of {self.max_body} bytes"
                return await error_response(413, "PayloadTooLarge", message)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], then=None):
    """An ASGI receive that gives ``messages`` first, then waits on ``then`` (disconnects)."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


def validation_response(errors: list[dict]) -> JSONResponse:
    parts, fields = [], []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "body"
        fields.append(name)
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "the request body is not valid JSON for this endpoint"
    body = {"error": "RequestValidationError", "detail": message, "body": "", "errors": message}
    body["field"] = fields[0] if fields else None
    return JSONResponse(body, status_code=422)
