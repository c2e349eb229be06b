# mypy: disable-error-code="no-untyped-call"
# Panel's widget and pane constructors take **params without annotations; every call would need an ignore.
"""The operator cockpit (``/cockpit``): drill-down, trends, alarms, dispatch queue, manual commands.

An operator signs in with tenant, username and password (``POST /api/v1/auth/login``; the token
stays in this session) or opens the page with ``?token=``. Everything that needs the network (the
login, a trend's history, acknowledge and shelve, approve and reject, a manual command) runs on the
data hub's loop and comes back as a future, which the 0.5 s periodic callback collects: a Panel
callback never waits on the server.

A manual command takes two clicks: **Send…** shows what will be written where, **Confirm** sends it;
the answer is the gateway's verified outcome (or the server's refusal), never an optimistic "done".
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DatetimeTickFormatter
from bokeh.plotting import figure

from cockpit.client import ApiError
from cockpit.data import (
    CommandOutcome,
    Credentials,
    DataHub,
    DataLayer,
    DispatchView,
    PointInfo,
    Snapshot,
    point_label,
)
from cockpit.i18n import NO_VALUE, Lang, format_date, format_number, format_time, t, t_or
from cockpit.style import ACCENT, CARD, MUTED, PRIORITY_COLOURS, esc, panel_css
from scada.model import UTC

__all__ = ["OperatorCockpit"]

TREND_ROLLOVER = 5000
QUEUE_OTHERS = 10
"""Decided or finished dispatches listed under the waiting ones."""
SHELVE_CHOICES_S = (900, 3600, 4 * 3600, 8 * 3600)
LEVELS = ("group", "park", "enterprise", "workshop")


def parse_value(raw: str) -> float:
    """Return the number an operator typed; ValueError names the field.

    >>> parse_value(" 35 "), parse_value("-2.5")
    (35.0, -2.5)
    >>> parse_value("nan")
    Traceback (most recent call last):
    ...
    ValueError: value: a finite number, not 'nan'
    """
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"value: a finite number, not {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"value: a finite number, not {raw!r}")
    return value


def _number(value: float | None) -> str:
    """Return a set value as typed: no thousands separator, no trailing zeros."""
    return NO_VALUE if value is None else f"{value:g}"


def _wall_time(ts: datetime, zone: tzinfo) -> datetime:
    """Return ``ts`` as the site's wall-clock time: Bokeh draws datetimes as UTC, the axis must not."""
    return ts.astimezone(zone).replace(tzinfo=None)


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
        section = {"background": CARD, "border-radius": "8px", "padding": "10px"}
        queue = self._build_queue(section)
        commands = self._build_commands()
        tree = pn.Column(
            pn.pane.HTML(
                f'<div class="card-title">{esc(t("hierarchy", lang))}</div>', stylesheets=self._css, height=30
            ),
            self._crumbs,
            self._up,
            self._children,
            self._detail,
            commands,
            styles=section,
            width=410,
        )
        trend = pn.Column(
            pn.Column(self._trend_title, self._trend, styles=section, sizing_mode="stretch_width"),
            queue,
            sizing_mode="stretch_width",
        )
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
            pn.Row(tree, trend, alarms, sizing_mode="stretch_width"),
        ]
        self._refresh(self.layer.snapshot)

    def _build_queue(self, section: dict[str, str]) -> pn.Column:
        lang = self.lang
        self._queue_table = pn.pane.HTML(
            "", stylesheets=self._css, sizing_mode="stretch_width", css_classes=["dispatch-table"]
        )
        self._dispatch_select = pn.widgets.Select(options={}, width=300, css_classes=["dispatch-select"])
        self._dispatch_comment = pn.widgets.TextInput(
            placeholder=t("decision_comment", lang),
            width=260,
            css_classes=["dispatch-comment"],
        )
        self._approve = pn.widgets.Button(
            label=t("approve", lang), color="success", width=120, css_classes=["dispatch-approve"]
        )
        self._reject = pn.widgets.Button(
            label=t("reject", lang), color="danger", width=120, css_classes=["dispatch-reject"]
        )
        self._approve.on_click(lambda _e: self._on_decide(approve=True))
        self._reject.on_click(lambda _e: self._on_decide(approve=False))
        self._dispatch_feedback = pn.pane.HTML(
            "", stylesheets=self._css, sizing_mode="stretch_width", css_classes=["dispatch-feedback"]
        )
        return pn.Column(
            pn.pane.HTML(
                f'<div class="card-title">{esc(t("dispatch_queue", lang))}</div>',
                stylesheets=self._css,
                height=30,
            ),
            self._queue_table,
            pn.Row(self._dispatch_select, self._dispatch_comment),
            pn.Row(self._approve, self._reject),
            self._dispatch_feedback,
            styles=section,
            sizing_mode="stretch_width",
        )

    def _build_commands(self) -> pn.Column:
        lang = self.lang
        self._pending_command: tuple[str, float, str] | None = None  # (point, value, reason) to confirm
        self._command_title = pn.pane.HTML("", stylesheets=self._css, width=380)
        self._command_value = pn.widgets.TextInput(
            placeholder=t("command_value", lang), width=140, css_classes=["command-value"]
        )
        self._command_reason = pn.widgets.TextInput(
            placeholder=t("command_reason", lang), width=220, css_classes=["command-reason"]
        )
        self._command_send = pn.widgets.Button(
            label=t("send", lang), color="primary", width=120, css_classes=["command-send"]
        )
        self._command_send.on_click(self._on_command_send)
        self._command_inputs = pn.Column(
            pn.Row(self._command_value, self._command_reason), self._command_send, visible=False
        )
        self._command_question = pn.pane.HTML("", stylesheets=self._css, width=380)
        self._command_confirm = pn.widgets.Button(
            label=t("confirm", lang), color="warning", width=120, css_classes=["command-confirm"]
        )
        self._command_cancel = pn.widgets.Button(
            label=t("cancel", lang), width=120, css_classes=["command-cancel"]
        )
        self._command_confirm.on_click(self._on_command_confirm)
        self._command_cancel.on_click(self._on_command_cancel)
        self._command_confirmation = pn.Column(
            self._command_question, pn.Row(self._command_confirm, self._command_cancel), visible=False
        )
        self._command_feedback = pn.pane.HTML(
            "", stylesheets=self._css, width=380, css_classes=["command-feedback"]
        )
        return pn.Column(
            pn.pane.HTML(
                f'<div class="card-title">{esc(t("manual_commands", lang))}</div>',
                stylesheets=self._css,
                height=30,
            ),
            self._command_title,
            self._command_inputs,
            self._command_confirmation,
            self._command_feedback,
            width=390,
        )

    def _trend_figure(self) -> Any:
        fig = figure(
            height=360,
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
        fig.xaxis.formatter = DatetimeTickFormatter(
            seconds="%H:%M:%S", minsec="%H:%M:%S", hours="%H:%M", minutes="%H:%M", days="%m-%d"
        )
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
            self._drop_pending_command()
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
        self._drop_pending_command()
        self._refresh(snap)

    def _select_point(self, point_id: str) -> None:
        assert self.layer is not None
        self._point = point_id
        self._drop_pending_command()
        self._command_feedback.object = ""
        self._render_command_box(self.layer.snapshot)
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
        assert self.layer is not None
        zone = self.layer.snapshot.zone
        xs = [_wall_time(ts, zone) for ts, _ in rows]
        ys = [float("nan") if v is None else v for _, v in rows]
        self._trend_source.data = {"x": xs, "y": ys}
        self._trend_last = rows[-1][0] if rows else None

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
                mark = (
                    f' <span class="muted">✎ {esc(t("writable", lang))}</span>'
                    if info and info.writable
                    else ""
                )
                rows.append(
                    f'<tr data-point="{esc(point_id)}"><td>{esc(info.name if info else point_id)}{mark}</td>'
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
        text = self._failure(err)
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
        self._render_queue(snap)
        self._render_command_box(snap)

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
        self._trend_source.stream(
            {"x": [_wall_time(sample.ts, snap.zone)], "y": [value]}, rollover=TREND_ROLLOVER
        )

    # ---- the dispatch queue ------------------------------------------------------------------------

    def _render_queue(self, snap: Snapshot) -> None:
        lang, zone = self.lang, snap.zone
        waiting = [d for d in snap.dispatches if d.waiting]
        shown = waiting + [d for d in snap.dispatches if not d.waiting][:QUEUE_OTHERS]
        if not shown:
            self._queue_table.object = (
                f'<div class="muted" data-empty="dispatch-queue">{esc(t("no_dispatches", lang))}</div>'
            )
        else:
            rows = []
            for d in shown:
                info = snap.points.get(d.point)
                unit = info.unit if info else ""
                rule = f"{d.rule_id} · {t('stage_n', lang, n=d.stage)}"
                rows.append(
                    f'<tr data-dispatch="{d.id}" data-state="{esc(d.state)}"><td>#{d.id}</td>'
                    f"<td>{format_time(d.created_at, zone)}</td>"
                    f'<td class="dstate-{esc(d.state)}">{esc(self._state_label(d.state))}</td>'
                    f"<td>{esc(point_label(snap, d.point))} → <b>{esc(_number(d.value))}</b> {esc(unit)}</td>"
                    f"<td>{esc(rule)}</td>"
                    f'<td style="text-align:right">{format_number(d.expected_kw, 1)}</td></tr>'
                    f'<tr class="sub"><td></td><td colspan="5">{esc(self._dispatch_detail(d))}</td></tr>'
                )
            self._queue_table.object = (
                f'<table class="list"><tr><th>#</th><th>{esc(t("col_time", lang))}</th>'
                f"<th>{esc(t('state', lang))}</th><th>{esc(t('col_point', lang))}</th>"
                f"<th>{esc(t('col_rule', lang))}</th><th>{esc(t('col_expected', lang))}</th></tr>"
                f"{''.join(rows)}</table>"
            )
        options = {f"#{d.id} · {point_label(snap, d.point)} → {_number(d.value)}": d.id for d in waiting}
        if options != self._dispatch_select.options:
            current = self._dispatch_select.value
            self._dispatch_select.options = options
            if current in options.values():
                self._dispatch_select.value = current
            elif options:
                self._dispatch_select.value = next(iter(options.values()))

    def _state_label(self, state: str) -> str:
        return t_or(f"dstate_{state}", self.lang, state)

    def _dispatch_detail(self, d: DispatchView) -> str:
        """Return the second line of a queue row: reason, result and decision."""
        lang = self.lang
        parts = [d.reason] if d.reason else []
        result = d.result
        if result is not None:
            status = str(result.get("status", ""))
            summary = [t_or(f"cstatus_{status}", lang, status)]
            readback = result.get("readback")
            if isinstance(readback, int | float):
                summary.append(t("readback", lang, value=_number(float(readback))))
            if isinstance(result.get("attempts"), int) and result["attempts"] > 1:
                summary.append(t("attempts", lang, n=result["attempts"]))
            if result.get("reason"):
                summary.append(str(result["reason"]))
            parts.append(f"{t('col_result', lang)}: {', '.join(summary)}")
        if d.decided_by:
            decided = t("decided_by", lang, who=d.decided_by)
            parts.append(f"{decided}: {d.decision_comment}" if d.decision_comment else decided)
        return " · ".join(parts)

    def _on_decide(self, *, approve: bool) -> None:
        if self.layer is None:
            return
        raw = self._dispatch_select.value
        if raw is None:
            self._dispatch_feedback.object = (
                f'<span class="feedback-error" data-dispatch-feedback="error">'
                f"{esc(t('no_waiting', self.lang))}</span>"
            )
            return
        dispatch_id = int(raw)
        comment = (self._dispatch_comment.value or "").strip()
        self._approve.disabled = self._reject.disabled = True
        self._dispatch_feedback.object = f'<span class="muted">{esc(t("sending", self.lang))}</span>'
        future = (
            self.layer.approve(dispatch_id, comment=comment)
            if approve
            else self.layer.reject(dispatch_id, comment=comment)
        )
        self._await(future, self._decided, self._decision_failed)

    def _decided(self, dispatch: DispatchView) -> None:
        self._approve.disabled = self._reject.disabled = False
        self._dispatch_comment.value = ""
        ok = dispatch.state in ("verified", "rejected", "approved", "sending")
        text = f"{t('dispatch_n', self.lang, id=dispatch.id)}: {self._state_label(dispatch.state)}"
        detail = self._dispatch_detail(dispatch)
        self._dispatch_feedback.object = (
            f'<span class="{"feedback-ok" if ok else "feedback-error"}" '
            f'data-dispatch-feedback="{esc(dispatch.state)}">{esc(text)}</span>'
            f'<div class="muted">{esc(detail)}</div>'
        )

    def _decision_failed(self, err: ApiError) -> None:
        self._approve.disabled = self._reject.disabled = False
        self._dispatch_feedback.object = (
            f'<span class="feedback-error" data-dispatch-feedback="error">{esc(self._failure(err))}</span>'
        )

    def _failure(self, err: ApiError) -> str:
        detail = f"{err.status} {err.title}: {err.detail}" if err.status else err.detail
        return t("action_failed", self.lang, detail=detail)

    # ---- manual commands ---------------------------------------------------------------------------

    def _command_point(self, snap: Snapshot) -> PointInfo | None:
        return snap.points.get(self._point) if self._point else None

    def _render_command_box(self, snap: Snapshot) -> None:
        info = self._command_point(snap)
        if info is None:
            note, show = "select_writable", False
        elif not info.writable:
            note, show = "read_only", False
        else:
            note, show = "", True
        if show and info is not None:
            title = f"{point_label(snap, info.id)} ({info.unit})" if info.unit else point_label(snap, info.id)
            html = f'<div data-command-point="{esc(info.id)}"><b>{esc(title)}</b></div>'
        else:
            html = f'<div class="muted" data-command-note="{note}">{esc(t(note, self.lang))}</div>'
        if self._command_title.object != html:
            self._command_title.object = html
        if self._command_inputs.visible != show:
            self._command_inputs.visible = show

    def _drop_pending_command(self) -> None:
        self._pending_command = None
        self._command_confirmation.visible = False
        self._command_send.disabled = False

    def _on_command_send(self, _event: object) -> None:
        if self.layer is None:
            return
        snap = self.layer.snapshot
        info = self._command_point(snap)
        if info is None or not info.writable:
            return
        try:
            value = parse_value(self._command_value.value or "")
        except ValueError:
            self._command_feedback.object = (
                f'<span class="feedback-error" data-command-status="invalid">'
                f"{esc(t('value_invalid', self.lang))}</span>"
            )
            return
        self._pending_command = (info.id, value, (self._command_reason.value or "").strip())
        question = t(
            "confirm_write", self.lang, value=_number(value), unit=info.unit, point=point_label(snap, info.id)
        )
        self._command_question.object = f'<div data-confirm="{esc(info.id)}"><b>{esc(question)}</b></div>'
        self._command_feedback.object = ""
        self._command_send.disabled = True
        self._command_confirmation.visible = True

    def _on_command_cancel(self, _event: object) -> None:
        self._drop_pending_command()
        self._command_feedback.object = (
            f'<span class="muted" data-command-status="cancelled">{esc(t("cancelled", self.lang))}</span>'
        )

    def _on_command_confirm(self, _event: object) -> None:
        pending = self._pending_command
        if pending is None or self.layer is None:
            return
        point, value, reason = pending
        self._pending_command = None
        self._command_confirmation.visible = False
        self._command_feedback.object = (
            f'<span class="muted" data-command-status="sending">{esc(t("sending", self.lang))}</span>'
        )
        future = self.layer.command(point, value, reason=reason)
        self._await(future, self._command_done, self._command_failed)

    def _command_done(self, outcome: CommandOutcome) -> None:
        self._command_send.disabled = False
        lang = self.lang
        assert self.layer is not None
        snap = self.layer.snapshot
        status = t_or(f"cstatus_{outcome.status}", lang, outcome.status)
        parts = [f"{point_label(snap, outcome.point)} = {_number(outcome.requested)}: {status}"]
        if outcome.readback is not None:
            parts.append(t("readback", lang, value=_number(outcome.readback)))
        if outcome.elapsed_ms is not None:
            parts.append(f"{outcome.elapsed_ms:.0f} ms")
        if outcome.reason and not outcome.verified:
            parts.append(outcome.reason)
        css = "feedback-ok" if outcome.verified else "feedback-error"
        mark = "✓" if outcome.verified else "✗"
        self._command_feedback.object = (
            f'<span class="{css}" data-command-status="{esc(outcome.status)}">'
            f"{mark} {esc(' · '.join(parts))}</span>"
        )

    def _command_failed(self, err: ApiError) -> None:
        self._command_send.disabled = False
        self._command_feedback.object = (
            f'<span class="feedback-error" data-command-status="refused">{esc(self._failure(err))}</span>'
        )
