"""The server's error type, A1111's error shape ``{"error", "detail", "body", "errors"}``, and the guard in
front of every route: HTTP Basic authentication, the request body limit and the shared JSON check
(``check_json``: well-formed UTF-8 JSON, nested at most ``MAX_JSON_DEPTH`` levels, at most
``MAX_JSON_ITEMS`` values, no unpaired surrogates), so that every endpoint gets the same limits."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import re
from typing import Any

from fastapi.responses import JSONResponse

from latentforge.pipelines.request import RequestError

MAX_JSON_DEPTH = 32  # A1111's deepest payloads (ControlNet units in alwayson_scripts) nest about 5 levels
MAX_JSON_ITEMS = 100_000  # values (numbers, strings, lists, objects) in one request body
MAX_MESSAGE_CHARS = 2000  # an error message is cut here (it may quote what the client sent)
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # JSON strings (unrolled: fast on long ones)


class FieldError(RequestError):
    """A request error about one field (its A1111 name is in ``field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ApiError(Exception):
    """An HTTP error with a message for the client (``field`` names the request field at fault)."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "RequestError"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_response(status: int, kind: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    if len(message) > MAX_MESSAGE_CHARS:  # messages quote values the client sent: keep them short
        message = message[: MAX_MESSAGE_CHARS - 12] + " ... (cut)"
    body = {"error": kind, "detail": message, "body": "", "errors": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


_SINGLE_HEADERS = (b"content-type", b"content-length")  # headers whose repeats could split what is checked


class Guard:
    """ASGI middleware: HTTP Basic authentication (constant-time comparison), the body size limit, and the
    500 of an unhandled error (``internal_error``): inside the CORS middleware, unlike Starlette's own
    last-resort handler, so that every error a browser client gets carries the CORS headers."""

    def __init__(self, app, users: list[tuple[str, str]], max_body: int):
        self.app, self.max_body = app, max_body
        self.tokens = [base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in users]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("headers") or []
        headers = dict(raw)  # (the last of a repeated header)
        if sum(1 for k, _ in raw if k in _SINGLE_HEADERS) > len({k for k, _ in raw if k in _SINGLE_HEADERS}):
            # Starlette reads the first Content-Type: the JSON checks below must see the one the routes read
            message = "the request repeats a Content-Type or Content-Length header; send each once"
            return await error_response(400, "BadRequest", message)(scope, receive, send)
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
        data = b"".join(chunks)
        if data and scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            kind = headers.get(b"content-type")
            if len(data) > 1 << 20:  # parsing a large body takes a while: not on the event loop
                import anyio.to_thread

                problem = await anyio.to_thread.run_sync(json_problem, data, kind)
            else:
                problem = json_problem(data, kind)
            if problem is not None:
                del data, chunks  # the response does not need them
                response = error_response(problem.status, problem.kind, problem.message, problem.field)
                return await response(scope, receive, send)
        body = {"type": "http.request", "body": data, "more_body": False}
        return await internal_error(self.app, scope, _replay([body], receive), send)


INTERNAL_MESSAGE = "the server failed on this request; the server log has the details"


async def internal_error(app, scope, receive, send) -> None:
    """``app``, with an error it raises before its response started logged (traceback and all) and answered
    with a 500 that names no internals; after the start, the error goes on up (the response is cut)."""
    started = False

    async def watch(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, watch)
    except Exception:
        if started:
            raise
        logging.getLogger("latentforge.server").exception("internal error on %s", scope.get("path"))
        await error_response(500, "InternalError", INTERNAL_MESSAGE)(scope, receive, send)


def json_problem(data: bytes, content_type: bytes | None) -> ApiError | None:
    """``check_json``'s error, returned rather than raised and holding no traceback or context: raised
    across a thread into a coroutine, it would keep the body (and the decoded text) in a reference cycle
    until the next full garbage collection."""
    try:
        check_json(data, content_type)
    except ApiError as e:
        e.__traceback__ = e.__context__ = e.__cause__ = None
        return e
    return None


def check_json(data: bytes, content_type: bytes | None) -> None:
    """ApiError unless ``data``, sent as JSON (or with no Content-Type), is a body every route can take in
    bounded time and memory: UTF-8, well-formed, at most ``MAX_JSON_ITEMS`` values nested at most
    ``MAX_JSON_DEPTH`` deep, with text that can be written back out (no unpaired surrogates such as
    ``"\\ud800"``)."""
    kind = (content_type or b"application/json").decode("latin-1").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        return  # not read as JSON by any route (validation_response says to send JSON where one is needed)
    # count the values before parsing: a body of "[[],[],...]" is millions of Python objects
    items = data.count(b"[") + data.count(b"{") + data.count(b",")
    if items > MAX_JSON_ITEMS:
        items = sum(_STRINGS.sub(b'""', data).count(c) for c in (b"[", b"{", b","))
        if items > MAX_JSON_ITEMS:
            message = f"the request body holds more than {MAX_JSON_ITEMS} JSON values; send fewer"
            raise ApiError(413, message, kind="PayloadTooLarge")
    try:
        value = json.loads(data)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 text (byte {e.start}); send JSON in UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            422, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}, char {e.pos})",
            kind="RequestValidationError",
        ) from None  # fmt: skip
    except RecursionError:
        raise ApiError(422, _too_deep("body"), kind="RequestValidationError") from None
    except ValueError:  # a number with more digits than Python converts (4300)
        message = "the request body holds a number with thousands of digits; no field takes one"
        raise ApiError(422, message, kind="RequestValidationError") from None
    _walk(value)


def _too_deep(where: str) -> str:
    return f"{where}: the JSON is nested more than {MAX_JSON_DEPTH} levels deep; the limit is {MAX_JSON_DEPTH}"


def _values(value: Any):
    """Every value of a parsed body with its place (a tuple of keys and indexes, made into a name only for
    a message), depth first, without recursion; a container's items come after it, so a consumer that
    raises on a container stops the walk before it goes deeper."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        v, path = stack.pop()
        yield v, path
        if isinstance(v, dict):
            stack.extend((x, (*path, k)) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, (*path, i)) for i, x in enumerate(v))


def _walk(value: Any) -> None:
    """Depth and text checks (the item count above bounds the work)."""
    for v, path in _values(value):
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise ApiError(422, _too_deep(_name(path)), _name(path), "RequestValidationError")
            for k in v if isinstance(v, dict) else ():
                _check_text(k, path)


def non_finite(value: Any) -> str | None:
    """The place (``hr_scale``, ``override_settings.x``, ``extra[2]``) of a NaN or infinite number in a parsed
    body, or None. ``json.loads`` accepts ``NaN`` and ``Infinity``, but JSON has no such numbers and
    the A1111 routes echo the request: such a value is refused before the job runs. The walk is bounded as
    ``_walk``'s is (by the body's item count)."""
    bad = (path for v, path in _values(value) if isinstance(v, float) and not math.isfinite(v))
    return next((_name(path) for path in bad), None)


def _name(path: tuple) -> str:
    """A value's place as a field name (``override_settings.x``, ``init_images[0]``), cut short."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
        if len(text) > 80:
            return text[:77] + "..."
    return text or "body"


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = _name(path)
        raise ApiError(
            422, f"{where}: the text holds an unpaired surrogate {text[e.start]!r} at {e.start}; send valid Unicode",
            where, "RequestValidationError",
        ) from None  # fmt: skip


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
        if err.get("type") == "json_invalid":  # normally refused by check_json already
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON: {reason}".rstrip(": "))
            fields.append("body")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc) or "body"
        fields.append(name)
        if not loc and isinstance(err.get("input"), (bytes, str, list, int, float)):
            parts.append("body: the request body must be a JSON object sent with Content-Type: application/json")
            continue
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "the request body is not valid JSON for this endpoint"
    body = {"error": "RequestValidationError", "detail": message, "body": "", "errors": message}
    body["field"] = fields[0] if fields else None
    return JSONResponse(body, status_code=422)
