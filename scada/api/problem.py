"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Handlers raise :class:`ApiProblem` (or a kernel error, mapped here); the middleware turns it into a
response. Nothing else leaves the API: an unexpected exception is logged with its request id and
answered as a plain 500 problem with no traceback.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from scada.model import UTC, ConfigError, NotFound, ServiceError

__all__ = [
    "REQUEST_ID",
    "ApiProblem",
    "invalid",
    "json_object",
    "parse_id",
    "parse_time",
    "problem_middleware",
    "problem_response",
    "query_cursor",
    "query_int",
]

_LOGGER = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("request_id", str)
PROBLEM_TYPE_BASE = "https://carbonos.dev/problems/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiProblem(Exception):
    """An error the client should see: an HTTP status, a short title and a specific detail."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers: dict[str, str] = dict(headers or {})
        if "retry_after" in extra:
            self.headers["Retry-After"] = str(extra["retry_after"])
        self.extra = extra


def problem_response(problem: ApiProblem, *, instance: str, request_id: str) -> web.Response:
    """Render a problem as a JSON response with the problem+json media type."""
    body = {
        "type": PROBLEM_TYPE_BASE + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": instance,
        "request_id": request_id,
        **problem.extra,
    }
    return web.json_response(
        body,
        status=problem.status,
        content_type="application/problem+json",
        headers={**problem.headers, "X-Request-Id": request_id},
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id and map every error to a problem+json response."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except web.HTTPException as http:
        if http.status < 400:
            raise
        problem = ApiProblem(http.status, http.reason or "Error", http.text or http.reason or "")
        return problem_response(problem, instance=request.path, request_id=request_id)
    except Exception as err:  # noqa: BLE001 -- mapped below; the unexpected ones are logged, never leaked
        return problem_response(
            _problem_for(err, request, request_id), instance=request.path, request_id=request_id
        )
    response.headers.setdefault("X-Request-Id", request_id)
    return response


def _problem_for(err: Exception, request: web.Request, request_id: str) -> ApiProblem:
    """Translate an exception from a handler into the problem the client sees."""
    match err:
        case ApiProblem():
            return err
        case NotFound():
            return ApiProblem(404, "Not found", str(err))
        case ConfigError():
            return ApiProblem(400, "Invalid request", str(err))
        case asyncpg.DataError():  # SQLSTATE class 22: a value the database refuses (a NUL in a text...)
            return ApiProblem(400, "Invalid request", f"a value cannot be stored or compared: {err}")
        case ServiceError() | TimeoutError():
            _LOGGER.warning("request %s: service unavailable: %r", request_id, err)
            return ApiProblem(503, "Service unavailable", str(err) or "a backing service timed out")
        case _:
            _LOGGER.error(
                "request %s: unhandled error on %s %s", request_id, request.method, request.path, exc_info=err
            )
            return ApiProblem(500, "Internal error", "the server failed; see its log", slug="internal-error")


def invalid(detail: str) -> ApiProblem:
    """Return the 400 problem of a request whose ``detail`` names the bad field."""
    return ApiProblem(400, "Invalid request", detail, slug="invalid-request")


def parse_time(raw: str | None, name: str) -> datetime | None:
    """Return an ISO 8601 time with a zone as UTC (None when absent); a 400 problem otherwise."""
    if raw is None or raw == "":
        return None
    try:
        value = datetime.fromisoformat(raw.replace(" ", "+"))  # '+' in a query string arrives as ' '
    except ValueError:
        raise invalid(f"{name}: not an ISO 8601 time: {raw!r}") from None
    if value.tzinfo is None:
        raise invalid(f"{name}: give a time zone, e.g. {raw}Z")
    return value.astimezone(UTC)


def query_int(query: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    """Return integer query parameter ``name`` in [low, high] (``default`` when absent); 400 otherwise."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"{name}: not an integer: {raw!r}") from None
    if not low <= value <= high:
        raise invalid(f"{name}: must be within [{low}, {high}]")
    return value


def parse_id(raw: str, *, max_digits: int = 18) -> int | None:
    """Return a database id or sequence number written in ASCII digits, or None if ``raw`` is not one."""
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > max_digits:
        return None
    return int(raw)


def query_cursor(query: Mapping[str, str], *, max_digits: int = 18) -> int:
    """Return the ``cursor`` query parameter (a number the previous page gave; 0 when absent)."""
    value = parse_id(query.get("cursor", "0"), max_digits=max_digits)
    if value is None:
        raise invalid("cursor: the next_cursor of the previous page")
    return value


class _NotPortableJson(ValueError):
    """A number JSON parsers disagree on: NaN, Infinity, or an integer beyond a double's range."""


def _refuse_constant(name: str) -> Any:
    raise _NotPortableJson(f"{name} is not a JSON number")


def _portable_int(text: str) -> int:
    try:
        value = int(text)  # a ValueError past Python's 4300-digit limit
        float(value)  # an OverflowError past a double's range: the handlers' float checks would raise it
    except (ValueError, OverflowError):
        raise _NotPortableJson(f"the integer {text[:12]}... ({len(text)} digits) is too large") from None
    return value


_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_portable_int)


async def json_object(request: web.Request, allowed: Collection[str]) -> dict[str, Any]:
    """Return the request body as a JSON object with no field outside ``allowed``; 400 otherwise.

    The body is read as UTF-8 (RFC 8259) whatever charset the request names, so an unknown charset
    cannot fail the request. Refused with a 400 naming the problem: bytes that are not UTF-8 or not
    JSON, nesting deeper than the parser's recursion limit, NaN and Infinity, integers beyond a
    double's range (they would overflow the handlers' float checks) and strings with a lone UTF-16
    surrogate (an escaped code point from D800 to DFFF: no database or log can store them).
    """
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
        body = _JSON_DECODER.decode(text)
    except _NotPortableJson as err:
        raise invalid(f"body: {err}") from None
    except RecursionError:
        raise invalid("body: JSON nested too deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise invalid("body: not JSON") from None
    if "\\u" in text and _has_lone_surrogate(body):
        raise invalid("body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    if not isinstance(body, dict):
        raise invalid("body: expected a JSON object")
    unknown = sorted(set(body).difference(allowed))
    if unknown:
        raise invalid(f"body: unknown field {unknown[0]!r}")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """Return True if a string anywhere in ``value`` (keys included) cannot be encoded as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
