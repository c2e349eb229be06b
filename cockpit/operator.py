# mypy: disable-error-code="no-untyped-call"
# Panel's widget and pane constructors take **params without annotations; every call would need an ignore.
"""The operator cockpit (``/cockpit``): hierarchy drill-down, trends, alarm actions, dispatch queue.

An operator signs in with tenant, username and password (``POST /api/v1/auth/login``; the token
stays in this session) or opens the page with ``?token=``. Everything that needs the network (the
login, a trend's history, acknowledge and shelve) runs on the data hub's loop and comes back as a
future, which the 0.5 s periodic callback collects: a Panel callback never waits on the server.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from datetime import datetime
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DatetimeTickFormatter
from bokeh.plotting import figure

from cockpit.client import ApiError
from cockpit.data import Credentials, DataHub, DataLayer, Snapshot
from cockpit.i18n import NO_VALUE, Lang, format_date, format_number, format_time, t
from cockpit.style import ACCENT, CARD, MUTED, PRIORITY_COLOURS, esc, panel_css
from scada.model import UTC

__all__ = ["OperatorCockpit"]

TREND_ROLLOVER = 5000
SHELVE_CHOICES_S = (900, 3600, 4 * 3600, 8 * 3600)
LEVELS = ("group", "park", "enterprise", "workshop")


def _duration_label(seconds: int, lang: Lang) -> str:
    if seconds < 3600:
        return t("minutes", lang, n=seconds // 60)
    return t("hours", lang, n=seconds // 3600)


class OperatorCockpit:
    """One operator session: the sign-in form, then the cockpit over this credential's data layer."""

    def __init__(self, hub: DataHub, *, lang: Lang, token: str | None) -> None:
        self.hub, self.lang = hub, lang
        self.layer: DataLayer | None = None
        self._css = [panel_css(1.0)]
        self._pending: list[
            tuple[concurrent.futures.Future[Any], Callable[[Any], None], Callable[[ApiError], None]]
        ] = []
        self.panel = pn.Column(sizing_mode="stretch_width", margin=(10, 20))
        if token:
            self._open(Credentials(access_token=token), key=token)
        else:
            self._show_login()

    # ---- futures, collected by the periodic callback ----------------------------------------------

    def _await(
        self,
        future: concurrent.futures.Future[Any],
        done: Callable[[Any], None],
        failed: Callable[[ApiError], None],
    ) -> None:
        self._pending.append((future, done, failed))

    def _collect(self) -> None:
        still = []
        for future, done, failed in self._pending:
            if not future.done():
                still.append((future, done, failed))
                continue
            try:
                result = future.result()
            except ApiError as err:
                failed(err)
            else:
                done(result)
        self._pending = still

    def update(self) -> None:
        """Finish what the hub has answered, then refresh the views (the periodic callback)."""
        self._collect()
        if self.layer is not None:
            self._refresh(self.layer.snapshot)

    def close(self) -> None:
        """Release the data layer (the session ended)."""
        if self.layer is not None:
            self.hub.release(self.layer, self)
            self.layer = None

    # ---- sign in -------------------------------------------------------------------------------------

    def _show_login(self) -> None:
        lang = self.lang
        self._tenant = pn.widgets.TextInput(
            placeholder=t("tenant", lang), width=260, css_classes=["login-tenant"]
        )
        self._username = pn.widgets.TextInput(
            placeholder=t("username", lang), width=260, css_classes=["login-user"]
        )
        self._password = pn.widgets.PasswordInput(
            placeholder=t("password", lang), width=260, css_classes=["login-password"]
        )
        self._login_button = pn.widgets.Button(
            label=t("login", lang), color="primary", width=260, css_classes=["login-button"]
        )
        self._login_status = pn.pane.HTML("", stylesheets=self._css, width=400)
        self._login_button.on_click(self._on_login)
        self.panel.objects = [
            pn.pane.HTML(f'<div class="title">{esc(t("title_cockpit", lang))}</div>', stylesheets=self._css),
            self._tenant,
            self._username,
            self._password,
            self._login_button,
            self._login_status,
        ]

    def _on_login(self, _event: object) -> None:
        self._login_button.disabled = True
        self._login_status.object = "…"
        future = self.hub.login(
            (self._tenant.value or "").strip(),
            (self._username.value or "").strip(),
            self._password.value or "",
        )
        self._await(future, self._logged_in, self._login_failed)

    def _logged_in(self, credentials: Credentials) -> None:
        self._open(credentials, key=self.hub.new_key())

    def _login_failed(self, err: ApiError) -> None:
        self._login_button.disabled = False
        failed = f"{t('login_failed', self.lang)}: {err.detail or err.title}"
        self._login_status.object = f'<span class="feedback-error">{esc(failed)}</span>'

    # ---- the cockpit ---------------------------------------------------------------------------------

    def _open(self, credentials: Credentials, *, key: str) -> None:
        self.layer = self.hub.acquire(credentials, key=key)
        lang = self.lang
        self._seen_version = -1
        self._cursor: tuple[str, str] | None = None  # ("node" | "device", id); None: the top
        self._point: str | None = None
        self._updating_children = False
        self._wanted: set[str] | None = None
        self._trend_last: datetime | None = None
        self._header = pn.pane.HTML("", stylesheets=self._css, sizing_mode="stretch_width", height=50)
        self._crumbs = pn.pane.HTML("", stylesheets=self._css, width=380)
        self._up = pn.widgets.Button(label="↑ " + t("up", lang), width=120, css_classes=["tree-up"])
        self._up.on_click(self._go_up)
        self._children = pn.widgets.MultiSelect(options={}, size=14, width=380, css_classes=["tree-children"])
        self._children.param.watch(self._on_child, "value")
        self._detail = pn.pane.HTML("", stylesheets=self._css, width=380)
        self._trend_source = ColumnDataSource({"x": [], "y": []})
        self._trend = self._trend_figure()
        self._trend_title = pn.pane.HTML(
            f'<div class="muted">{esc(t("select_point", lang))}</div>', stylesheets=self._css, height=30
        )
        self._alarm_table = pn.pane.HTML("", stylesheets=self._css, width=620, css_classes=["alarm-table"])
        self._alarm_select = pn.widgets.Select(
            label=t("select_alarm", lang), options={}, width=300, css_classes=["alarm-select"]
        )
        self._comment = pn.widgets.TextInput(
            placeholder=t("comment", lang), width=300, css_classes=["alarm-comment"]
        )
        self._ack = pn.widgets.Button(
            label=t("acknowledge", lang), color="primary", width=140, css_classes=["alarm-ack"]
        )
        self._ack.on_click(self._on_ack)
        self._shelve_reason = pn.widgets.TextInput(
            placeholder=t("reason", lang), width=300, css_classes=["alarm-reason"]
        )
        self._shelve_for = pn.widgets.Select(
            options={_duration_label(s, lang): s for s in SHELVE_CHOICES_S},
            value=3600,
            width=140,
        )
        self._shelve = pn.widgets.Button(
            label=t("shelve", lang), color="warning", width=140, css_classes=["alarm-shelve"]
        )
        self._shelve.on_click(self._on_shelve)
        self._feedback = pn.pane.HTML("", stylesheets=self._css, width=620, css_classes=["alarm-feedback"])
        self._queue = pn.pane.HTML(
            f'<div class="card"><div class="card-title">{esc(t("dispatch_queue", lang))}</div>'
            f'<div class="empty" data-empty="dispatch-queue">{esc(t("no_dispatches", lang))}</div>'
            f'<div class="muted">{esc(t("dispatch_note", lang))}</div></div>',
            stylesheets=self._css,
            width=620,
            height=170,
        )
        self._commands = pn.pane.HTML(
            f'<div class="card"><div class="card-title">{esc(t("manual_commands", lang))}</div>'
            f'<div class="muted">{esc(t("commands_note", lang))}</div></div>',
            stylesheets=self._css,
            width=620,
            height=100,
        )
        section = {"background": CARD, "border-radius": "8px", "padding": "10px"}
        tree = pn.Column(
            pn.pane.HTML(
                f'<div class="card-title">{esc(t("hierarchy", lang))}</div>', stylesheets=self._css, height=30
            ),
            self._crumbs,
            self._up,
            self._children,
            self._detail,
            styles=section,
            width=410,
        )
        trend = pn.Column(self._trend_title, self._trend, styles=section, sizing_mode="stretch_width")
        alarms = pn.Column(
            pn.pane.HTML(
                f'<div class="card-title">{esc(t("alarm_list", lang))}</div>',
                stylesheets=self._css,
                height=30,
            ),
            self._alarm_table,
            pn.Row(self._alarm_select, self._comment),
            pn.Row(self._ack),
            pn.Row(self._shelve_reason, self._shelve_for, self._shelve),
            self._feedback,
            styles=section,
            width=650,
        )
        self.panel.objects = [
            self._header,
            pn.Row(tree, trend, pn.Column(alarms, self._queue, self._commands), sizing_mode="stretch_width"),
        ]
        self._refresh(self.layer.snapshot)

    def _trend_figure(self) -> Any:
        fig = figure(
            height=420,
            sizing_mode="stretch_width",
            x_axis_type="datetime",
            toolbar_location="above",
            tools="pan,wheel_zoom,box_zoom,reset",
            background_fill_color=CARD,
            border_fill_color=CARD,
            outline_line_color=None,
        )
        for axis in (fig.xaxis, fig.yaxis):
            axis.major_label_text_color = MUTED
            axis.axis_line_color = "#1f3d55"
        fig.xaxis.formatter = DatetimeTickFormatter(hours="%H:%M", minutes="%H:%M", days="%m-%d")
        fig.grid.grid_line_color = "#15324a"
        fig.line("x", "y", source=self._trend_source, line_color=ACCENT, line_width=2)
        return fig

    # ---- drill-down ---------------------------------------------------------------------------------

    def _on_child(self, event: Any) -> None:
        if self._updating_children or not event.new:
            return
        kind, _, ident = str(event.new[0]).partition(":")
        if kind == "point":
            self._select_point(ident)
        else:
            self._cursor = (kind, ident)
            self._point = None
            self._seen_version = -1
            assert self.layer is not None
            self._refresh(self.layer.snapshot)

    def _go_up(self, _event: object) -> None:
        assert self.layer is not None
        snap = self.layer.snapshot
        if self._cursor is None:
            return
        kind, ident = self._cursor
        parent: str | None
        if kind == "device":
            device = snap.devices.get(ident)
            parent = device.node if device else None
        else:
            node = snap.nodes.get(ident)
            parent = node.parent if node else None
        self._cursor = ("node", parent) if parent else None
        self._point = None
        self._seen_version = -1
        self._refresh(snap)

    def _select_point(self, point_id: str) -> None:
        assert self.layer is not None
        self._point = point_id
        self._trend_last = None
        self._trend_source.data = {"x": [], "y": []}
        info = self.layer.snapshot.points.get(point_id)
        name = f"{info.name} ({info.unit})" if info else point_id
        self._trend_title.object = f'<div class="card-title">{esc(t("trend", self.lang))}: {esc(name)}</div>'
        self._await(
            self.layer.history(point_id), lambda rows: self._history_loaded(point_id, rows), self._show_error
        )

    def _history_loaded(self, point_id: str, rows: list[tuple[datetime, float | None]]) -> None:
        if point_id != self._point:
            return
        xs = [ts for ts, _ in rows]
        ys = [float("nan") if v is None else v for _, v in rows]
        self._trend_source.data = {"x": xs, "y": ys}
        self._trend_last = xs[-1] if xs else None

    def _children_options(self, snap: Snapshot) -> dict[str, str]:
        lang = self.lang
        options: dict[str, str] = {}
        if self._cursor is None:
            for root in snap.roots:
                node = snap.nodes[root]
                options[
                    f"{t('level_' + node.level, lang) if node.level in LEVELS else node.level} · {node.name}"
                ] = f"node:{root}"
            return options
        kind, ident = self._cursor
        if kind == "node" and ident in snap.nodes:
            for child in snap.nodes[ident].children:
                node = snap.nodes[child]
                options[
                    f"{t('level_' + node.level, lang) if node.level in LEVELS else node.level} · {node.name}"
                ] = f"node:{child}"
            for device in sorted((d for d in snap.devices.values() if d.node == ident), key=lambda d: d.id):
                options[f"{t('level_device', lang)} · {device.name}"] = f"device:{device.id}"
        elif kind == "device" and ident in snap.devices:
            for point_id in snap.devices[ident].points:
                info = snap.points.get(point_id)
                label = info.name if info else point_id
                options[f"{t('level_point', lang)} · {label}"] = f"point:{point_id}"
        return options

    def _path(self, snap: Snapshot) -> list[str]:
        names: list[str] = []
        if self._cursor is None:
            return names
        kind, ident = self._cursor
        node_id: str | None = ident
        if kind == "device":
            device = snap.devices.get(ident)
            names.append(device.name if device else ident)
            node_id = device.node if device else None
        while node_id is not None and node_id in snap.nodes:
            names.append(snap.nodes[node_id].name)
            node_id = snap.nodes[node_id].parent
        return list(reversed(names))

    def _render_detail(self, snap: Snapshot) -> str:
        lang = self.lang
        if self._cursor is None:
            return ""
        kind, ident = self._cursor
        if kind == "device" and ident in snap.devices:
            device = snap.devices[ident]
            zone = snap.zone
            rows = []
            for point_id in device.points:
                info = snap.points.get(point_id)
                sample = snap.latest.get(point_id)
                value = format_number(sample.value, 2) if sample else NO_VALUE
                when = format_time(sample.ts, zone, seconds=True) if sample else ""
                rows.append(
                    f'<tr data-point="{esc(point_id)}"><td>{esc(info.name if info else point_id)}</td>'
                    f'<td style="text-align:right">{value}</td><td>{esc(info.unit if info else "")}</td>'
                    f'<td class="muted">{when}</td></tr>'
                )
            state = (
                t(device.availability, lang)
                if device.availability in ("online", "offline", "stale")
                else t("unknown", lang)
            )
            reason = f" · {esc(device.availability_reason)}" if device.availability_reason else ""
            return (
                f'<div data-availability="{esc(device.availability)}">{esc(state)}{reason}</div>'
                f'<table class="list"><tr><th>{esc(t("points", lang))}</th><th></th><th></th><th></th></tr>'
                f"{''.join(rows)}</table>"
            )
        devices = [d for d in snap.devices.values() if d.node in snap.descendants(ident)]
        offline = sum(1 for d in devices if d.availability == "offline")
        summary = f"{len(devices)} {t('level_device', lang)} · {offline} {t('offline', lang)}"
        return f'<div class="muted">{esc(summary)}</div>'

    # ---- alarms ---------------------------------------------------------------------------------------

    def _by(self) -> str:
        assert self.layer is not None
        return self.layer.snapshot.subject or "operator"

    def _on_ack(self, _event: object) -> None:
        alarm = self._alarm_select.value
        if not alarm or self.layer is None:
            self._feedback.object = f'<span class="feedback-error">{esc(t("select_alarm", self.lang))}</span>'
            return
        future = self.layer.acknowledge(str(alarm), by=self._by(), comment=self._comment.value or "")
        self._await(future, lambda _r: self._done(t("acknowledge", self.lang), str(alarm)), self._show_error)

    def _on_shelve(self, _event: object) -> None:
        alarm = self._alarm_select.value
        if not alarm or self.layer is None:
            self._feedback.object = f'<span class="feedback-error">{esc(t("select_alarm", self.lang))}</span>'
            return
        reason = (self._shelve_reason.value or "").strip()
        if not reason:
            self._feedback.object = (
                f'<span class="feedback-error">{esc(t("reason_required", self.lang))}</span>'
            )
            return
        future = self.layer.shelve(
            str(alarm), by=self._by(), reason=reason, duration_s=float(self._shelve_for.value)
        )
        self._await(future, lambda _r: self._done(t("shelve", self.lang), str(alarm)), self._show_error)

    def _done(self, action: str, alarm: str) -> None:
        text = t("action_done", self.lang, what=f"{action} {alarm}")
        self._feedback.object = f'<span class="feedback-ok" data-feedback="ok">{esc(text)}</span>'

    def _show_error(self, err: ApiError) -> None:
        detail = f"{err.status} {err.title}: {err.detail}" if err.status else err.detail
        text = t("action_failed", self.lang, detail=detail)
        self._feedback.object = f'<span class="feedback-error" data-feedback="error">{esc(text)}</span>'

    def _render_alarms(self, snap: Snapshot) -> None:
        lang, zone = self.lang, snap.zone
        alarms = sorted(snap.alarms, key=lambda a: (a.priority, -a.since.timestamp()))
        if not alarms:
            self._alarm_table.object = f'<div class="muted">{esc(t("no_alarms", lang))}</div>'
        else:
            rows = "".join(
                f'<tr data-alarm="{esc(a.alarm)}" data-state="{esc(a.state)}">'
                f'<td><span class="prio" style="background:{PRIORITY_COLOURS.get(a.priority, MUTED)}">'
                f"{esc(t(f'prio_{a.priority}', lang) if 1 <= a.priority <= 4 else a.priority)}</span></td>"
                f'<td class="state-{esc(a.state)}">{esc(t(f"state_{a.state}", lang))}</td>'
                f"<td>{format_time(a.since, zone)}</td><td>{esc(a.message)}</td></tr>"
                for a in alarms[:50]
            )
            self._alarm_table.object = (
                f'<table class="list"><tr><th>{esc(t("priority", lang))}</th><th>{esc(t("state", lang))}</th>'
                f"<th>{esc(t('since', lang))}</th><th>{esc(t('message', lang))}</th></tr>{rows}</table>"
            )
        options = {a.alarm: a.alarm for a in alarms}
        if options != self._alarm_select.options:
            current = self._alarm_select.value
            self._alarm_select.options = options
            if current in options.values():
                self._alarm_select.value = current

    # ---- refresh ---------------------------------------------------------------------------------------

    def _refresh(self, snap: Snapshot) -> None:
        now = datetime.now(UTC)
        zone = snap.zone
        live = "on" if snap.live else "off"
        errors = "; ".join(f"{k}: {v}" for k, v in sorted(snap.errors.items()))
        self._header.object = (
            f'<div class="header"><div><span class="title">{esc(t("title_cockpit", self.lang))}</span>'
            f'<span class="subtitle">{esc(snap.site_name)} · {esc(snap.subject)}</span></div>'
            f'<div><span class="clock">{format_date(now, self.lang, zone)} '
            f"{format_time(now, zone, seconds=True)}</span>"
            f'<span class="live {live}">● '
            f"{esc(t('connected' if snap.live else 'disconnected', self.lang))}</span>"
            f'<div class="muted" style="font-size:12px">{esc(errors)}</div></div></div>'
        )
        self._stream_trend(snap)
        if snap.version == self._seen_version:
            return
        self._seen_version = snap.version
        options = self._children_options(snap)
        if options != self._children.options:
            self._updating_children = True
            try:
                self._children.options = options
                self._children.value = []
            finally:
                self._updating_children = False
        path = self._path(snap)
        self._crumbs.object = (
            '<div class="crumbs">'
            + " \u203a ".join(
                f"<b>{esc(n)}</b>" if i == len(path) - 1 else esc(n) for i, n in enumerate(path)
            )
            + "</div>"
        )
        self._render_detail_and_want(snap)
        self._render_alarms(snap)

    def _render_detail_and_want(self, snap: Snapshot) -> None:
        self._detail.object = self._render_detail(snap)
        assert self.layer is not None
        wanted: set[str] = set()
        if self._cursor is not None and self._cursor[0] == "device" and self._cursor[1] in snap.devices:
            wanted.update(snap.devices[self._cursor[1]].points)
        if self._point:
            wanted.add(self._point)
        if wanted != self._wanted:
            self._wanted = wanted
            self.layer.want(self, wanted)

    def _stream_trend(self, snap: Snapshot) -> None:
        if self._point is None or self._trend_last is None:
            return
        sample = snap.latest.get(self._point)
        if sample is None or sample.ts <= self._trend_last:
            return
        self._trend_last = sample.ts
        value = float("nan") if sample.value is None else sample.value
        self._trend_source.stream({"x": [sample.ts], "y": [value]}, rollover=TREND_ROLLOVER)
