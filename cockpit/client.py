"""Python clients of the server: the live websocket (:class:`LiveClient`) and REST (:class:`ApiClient`).

The cockpit talks to the server like any third-party client, over HTTP only (docs/websocket.md):

>>> async def watch(base_url: str, token: str) -> None:  # doctest: +SKIP
...     async with LiveClient(base_url, token) as live:
...         await live.subscribe(nodes=["ws-a"], topics=["alarms"], max_rate_hz=2)
...         async for message in live.messages():
...             print(message["type"])

:class:`LiveClient` reconnects with capped, jittered backoff and subscribes again to everything it
was asked for; a connection that stays silent for three heartbeat periods counts as dead. Received
messages wait in a bounded queue that drops its oldest message when the reader falls behind
(``dropped_messages`` counts them), like the server's own per-client queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from scada.runtime import Backoff, raise_if_cancelling

__all__ = ["ApiClient", "ApiError", "ConnectionClosed", "LiveClient"]

_LOGGER = logging.getLogger(__name__)

SILENCE_LIMIT_S: Final = 35.0
"""No message for this long (three 10 s heartbeats and some) means the connection is dead."""


class ApiError(Exception):
    """The server answered a REST call with an error (its problem+json ``detail`` in the text)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail


class ConnectionClosed(Exception):
    """The live client was closed while a caller waited for messages."""


class ApiClient:
    """A small REST client: JSON in and out, errors raised as :class:`ApiError`."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 10.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str, **params: str | int | float) -> Any:
        """GET ``path`` (e.g. ``/api/v1/devices``) with query parameters; return the decoded JSON."""
        query = {k: str(v) for k, v in params.items()}
        return await self._call("GET", path, params=query)

    async def post(self, path: str, json: Any) -> Any:
        """POST a JSON body to ``path``; return the decoded JSON (None for 204)."""
        return await self._call("POST", path, json=json)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._session is None:
            raise RuntimeError("ApiClient: use it as 'async with ApiClient(...) as api:'")
        async with self._session.request(method, self._base_url + path, **kwargs) as response:
            if response.status == 204:
                return None
            text = await response.text()
            if response.status >= 400:
                title, detail = response.reason or "error", text
                with contextlib.suppress(ValueError):
                    problem = json.loads(text)
                    if isinstance(problem, dict):
                        title = str(problem.get("title", title))
                        detail = str(problem.get("detail", detail))
                raise ApiError(response.status, title, detail)
            return json.loads(text) if text else None


class LiveClient:
    """A websocket client of ``/api/v1/ws`` that reconnects and re-subscribes by itself."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        queue_size: int = 1_000,
        connect_timeout_s: float = 10.0,
        silence_limit_s: float = SILENCE_LIMIT_S,
        backoff: Backoff | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self._url = base_url.rstrip("/") + "/api/v1/ws"
        self._token = token
        self._connect_timeout_s = connect_timeout_s
        self._silence_limit_s = silence_limit_s
        self._backoff = backoff or Backoff(initial_s=0.5, max_s=15.0)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._subscriptions: list[dict[str, Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self.dropped_messages = 0
        """Messages dropped because the reader fell behind."""
        self.connections = 0
        """How many times a connection was established (1 + reconnects)."""

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run(), name="live-client")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        """Wait until a connection is up (raise TimeoutError after ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def subscribe(
        self,
        *,
        points: Sequence[str] = (),
        devices: Sequence[str] = (),
        nodes: Sequence[str] = (),
        topics: Sequence[str] = (),
        consoles: Sequence[str] | None = None,
        max_rate_hz: float | None = None,
    ) -> None:
        """Follow points, devices, nodes and topics; kept and sent again after every reconnect."""
        message: dict[str, Any] = {"type": "subscribe"}
        for name, values in (("points", points), ("devices", devices), ("nodes", nodes), ("topics", topics)):
            if values:
                message[name] = list(values)
        if consoles is not None:
            message["consoles"] = list(consoles)
        if max_rate_hz is not None:
            message["max_rate_hz"] = max_rate_hz
        self._subscriptions.append(message)
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.send_json(message)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Yield decoded server messages until the client is closed."""
        while not self._closed:
            yield await self._queue.get()

    async def next_message(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Return the next server message (raise TimeoutError after ``timeout_s``)."""
        if self._closed:
            raise ConnectionClosed("the live client is closed")
        async with asyncio.timeout(timeout_s):
            return await self._queue.get()

    async def _run(self) -> None:
        healthy = True
        while not self._closed:
            try:
                await self._connect_and_read()
                healthy = True
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                raise_if_cancelling()
                if healthy:
                    _LOGGER.warning("live client: connection to %s lost: %s", self._url, err)
                    healthy = False
            self._connected.clear()
            await asyncio.sleep(self._backoff.next_delay())

    async def _connect_and_read(self) -> None:
        session = self._session
        if session is None:
            raise RuntimeError("LiveClient: use it as 'async with LiveClient(...) as live:'")
        async with asyncio.timeout(self._connect_timeout_s):
            ws = await session.ws_connect(self._url, params={"token": self._token}, heartbeat=15.0)
        self._ws = ws
        try:
            for message in self._subscriptions:
                await ws.send_json(message)
            self.connections += 1
            self._backoff.reset()
            self._connected.set()
            while True:
                async with asyncio.timeout(self._silence_limit_s):
                    msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._put(json.loads(msg.data))
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    return
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    raise aiohttp.ClientError(f"websocket error: {ws.exception()}")
        finally:
            self._ws = None
            await ws.close()

    def _put(self, message: dict[str, Any]) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_messages += 1
        self._queue.put_nowait(message)
