# mypy: disable-error-code="no-untyped-call"
# Panel's widget and pane constructors take **params without annotations; every call would need an ignore.
"""Serve the big screen (``/bigscreen``) and the operator cockpit (``/cockpit``) with Panel.

One :class:`~cockpit.data.DataHub` per process holds the data layers; each Panel session builds
its view in the app function, reads the snapshot in a 0.5 s periodic callback and releases its layer
when the session is destroyed. Several cockpit processes can serve one server: each has its own hub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import panel as pn

from cockpit.bigscreen import DEFAULT_ROTATE_S, VIEWS, BigScreen, Layout
from cockpit.data import REFRESH_S, Credentials, DataHub
from cockpit.i18n import parse_lang, t
from cockpit.operator import OperatorCockpit
from cockpit.style import BODY_CSS, esc, panel_css

__all__ = ["TOKEN_ENV", "make_apps", "serve"]

_LOGGER = logging.getLogger(__name__)

TOKEN_ENV = "CARBONOS_TOKEN"  # noqa: S105 -- the name of a variable, not a secret
"""The kiosk token the big screen uses when the page names none (``?token=``)."""
UPDATE_PERIOD_MS = 500
"""How often a session reads the snapshot: a reading reaches the screen well within 2 s."""


def _query() -> dict[str, str]:
    args: dict[str, Any] = pn.state.session_args or {}
    out: dict[str, str] = {}
    for key, values in args.items():
        if values:
            raw = values[0]
            out[key] = raw.decode() if isinstance(raw, bytes) else str(raw)
    return out


def _rotate_s(raw: str | None) -> float:
    try:
        return float(raw) if raw else DEFAULT_ROTATE_S
    except ValueError:
        return DEFAULT_ROTATE_S


def make_apps(
    hub: DataHub, *, default_token: str | None = None
) -> dict[str, Callable[[], pn.viewable.Viewable]]:
    """Return the Panel app functions of both cockpits, served from ``hub``'s data layers."""

    def bigscreen() -> pn.viewable.Viewable:
        query = _query()
        lang = parse_lang(query.get("lang"))
        token = query.get("token") or default_token
        if not token:
            return pn.pane.HTML(
                f'<div class="title">{esc(t("error_token", lang))}</div>', stylesheets=[panel_css()]
            )
        layer = hub.acquire(Credentials(access_token=token))
        screen = BigScreen(
            layer,
            lang=lang,
            layout=Layout.parse(query.get("layout")),
            rotate_s=_rotate_s(query.get("rotate")),
            first_view=view if (view := query.get("view", VIEWS[0])) in VIEWS else VIEWS[0],
        )
        pn.state.add_periodic_callback(screen.update, period=UPDATE_PERIOD_MS)
        pn.state.on_session_destroyed(lambda _ctx: hub.release(layer, screen))
        return screen.panel

    def cockpit() -> pn.viewable.Viewable:
        query = _query()
        cockpit_view = OperatorCockpit(hub, lang=parse_lang(query.get("lang")), token=query.get("token"))
        pn.state.add_periodic_callback(cockpit_view.update, period=UPDATE_PERIOD_MS)
        pn.state.on_session_destroyed(lambda _ctx: cockpit_view.close())
        return cockpit_view.panel

    return {"bigscreen": bigscreen, "cockpit": cockpit}


def serve(
    api_url: str,
    *,
    port: int,
    address: str = "127.0.0.1",
    token: str | None = None,
    allow_origins: list[str] | None = None,
    refresh_s: float = REFRESH_S,
    threaded: bool = False,
) -> Any:
    """Serve both cockpits on ``address:port`` for the server at ``api_url``.

    ``token`` (else ``$CARBONOS_TOKEN``) is the big screen's kiosk token when a page names none.
    ``allow_origins`` are the ``host:port`` values browsers may open the websocket from (default:
    this address and ``localhost`` on ``port``). With ``threaded`` the server runs in a thread and
    the Panel server object is returned (its ``stop()`` also stops the data hub); otherwise this
    call blocks until the process is stopped.
    """
    hub = DataHub(api_url, refresh_s=refresh_s)
    hub.start()
    pn.extension(raw_css=[BODY_CSS])
    origins = allow_origins or [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    apps = make_apps(hub, default_token=token or os.environ.get(TOKEN_ENV) or None)
    try:
        server = pn.serve(
            apps,
            port=port,
            address=address,
            websocket_origin=origins,
            show=False,
            threaded=threaded,
            start=True,
            title={"bigscreen": "CarbonOS big screen", "cockpit": "CarbonOS cockpit"},
        )
    except BaseException:
        hub.stop()
        raise
    if not threaded:
        hub.stop()
        return None
    original_stop = server.stop

    def stop() -> None:
        original_stop()
        hub.stop()

    server.stop = stop
    return server
