# mypy: disable-error-code="no-untyped-call"
# Panel's pane constructors take **params without annotations; every call would need an ignore.
"""The control-room big screen (``/bigscreen``): read-only, full screen, views rotating every N s.

Always on screen: the title and clock, live power (total and by enterprise), today's energy and
tCO2e, the month's tCO2e and the alarm banner. Rotating below them: the carbon view (quota gauge,
forecast curve with its interval, Scope 1/2 split), the energy view (power by enterprise, top
emitters, PV and battery) and the operations view (latest dispatches, active alarms).

The session only reads the process's :class:`~cockpit.data.DataLayer` snapshot in a 0.5 s periodic
callback and re-renders what changed; it never touches the network.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DatetimeTickFormatter
from bokeh.models.annotations import Span, Title
from bokeh.plotting import figure

from cockpit.data import (
    AlarmView,
    DataLayer,
    DispatchView,
    QuotaView,
    Snapshot,
    node_power_kw,
    point_label,
    storage_status,
    top_emitters,
)
from cockpit.i18n import Lang, format_date, format_number, format_time, t, t_or
from cockpit.style import ACCENT, CARD, DANGER, MUTED, PRIORITY_COLOURS, TEXT, WARN, esc, panel_css
from scada.model import UTC

__all__ = ["ACTIVE_STATES", "VIEWS", "BigScreen", "Layout", "banner_order", "dispatch_effect", "gauge_svg"]

ACTIVE_STATES = frozenset({"active_unack", "active_ack", "rtn_unack"})
"""Alarm states an operator must see (shelved, suppressed and out-of-service ones are set aside)."""
_STATE_RANK = {"active_unack": 0, "active_ack": 1, "rtn_unack": 2}


def banner_order(alarms: Iterable[AlarmView]) -> list[AlarmView]:
    """Return the alarms a wall must show, most urgent first: priority, then standing, then newest."""
    return sorted(
        (a for a in alarms if a.state in ACTIVE_STATES),
        key=lambda a: (a.priority, _STATE_RANK[a.state], -a.since.timestamp()),
    )


def dispatch_effect(dispatch: DispatchView, lang: Lang) -> str:
    """Return what a wall says a dispatch achieved: a measured cut, else the expectation, marked as such.

    A dispatch is measured against its baseline after its hold and rebound window have passed
    (docs/dispatch-verification.md), so a row says "expected X kW · effect to be verified" until the
    measured ``co2e_avoided_kg`` arrives with the dispatch.
    """
    if dispatch.co2e_avoided_t is not None:
        return t("cut_co2", lang, value=format_number(dispatch.co2e_avoided_t, 2))
    pending = t("effect_pending", lang)
    if dispatch.expected_kw is None:
        return pending
    return f"{t('expected_kw', lang, value=format_number(dispatch.expected_kw, 1))} · {pending}"


VIEWS = ("carbon", "energy", "operations")
"""The rotating views, in order (``?view=`` names the first one shown)."""
BANNER_ALARMS = 3
MAX_DISPATCH_ROWS = 10
DEFAULT_ROTATE_S = 20.0
MAX_ENTERPRISE_CARDS = 4
"""Enterprises with a live power card of their own (all of them are in the energy view)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """A screen size: 1920x1080 (``scale`` 1) or 3840x2160 (``scale`` 2)."""

    width_px: int
    height_px: int

    @property
    def scale(self) -> float:
        """Return the size multiplier of fonts and panels relative to 1920x1080."""
        return self.width_px / 1920

    @classmethod
    def parse(cls, raw: str | None) -> Layout:
        """Return the layout a ``?layout=`` names (``1080`` or ``2160``); 1080 for anything else.

        >>> Layout.parse("2160").scale, Layout.parse(None).height_px
        (2.0, 1080)
        """
        return cls(3840, 2160) if raw == "2160" else cls(1920, 1080)


def gauge_svg(quota: QuotaView | None, lang: Lang, *, size_px: float) -> str:
    """Return an SVG half-dial of the month's emissions against the quota.

    The arc runs from 0 to 120 % of the quota (further if the forecast is beyond); the needle is the
    actual share, the marker and the thin arc the forecast and its interval.

    >>> gauge_svg(None, Lang.EN, size_px=400).count("No quota")
    1
    """
    width, height = size_px, size_px * 0.72
    cx, cy, r = width / 2, height * 0.78, size_px * 0.38
    if quota is None:
        return (
            f'<svg width="{width:.0f}" height="{height:.0f}"><text x="{cx:.0f}" y="{cy / 1.4:.0f}" '
            f'fill="{MUTED}" font-size="{size_px / 16:.0f}" text-anchor="middle">{esc(t("no_quota", lang))}'
            "</text></svg>"
        )
    forecast_pct = quota.forecast_pct
    top_pct = max(120.0, (forecast_pct or 0.0) * 1.1, (quota.actual_pct or 0.0) * 1.1)

    def point(pct: float, radius: float) -> tuple[float, float]:
        angle = math.pi * (1.0 - min(max(pct, 0.0), top_pct) / top_pct)
        return cx + radius * math.cos(angle), cy - radius * math.sin(angle)

    def arc(start_pct: float, end_pct: float, radius: float, colour: str, stroke: float) -> str:
        (x1, y1), (x2, y2) = point(start_pct, radius), point(end_pct, radius)
        return (
            f'<path d="M {x1:.1f} {y1:.1f} A {radius:.1f} {radius:.1f} 0 0 1 {x2:.1f} {y2:.1f}" '
            f'stroke="{colour}" stroke-width="{stroke:.1f}" fill="none"/>'
        )

    stroke = size_px * 0.07
    parts = [
        arc(0, 80, r, ACCENT, stroke),
        arc(80, 100, r, WARN, stroke),
        arc(100, top_pct, r, DANGER, stroke),
    ]
    if quota.forecast_low_t is not None and quota.forecast_high_t is not None and quota.quota_t > 0:
        low = 100.0 * quota.forecast_low_t / quota.quota_t
        high = 100.0 * quota.forecast_high_t / quota.quota_t
        parts.append(arc(low, max(high, low + 0.1), r + stroke * 0.9, "#9fd3ff", stroke * 0.25))
    if forecast_pct is not None:
        (x1, y1), (x2, y2) = point(forecast_pct, r - stroke * 0.7), point(forecast_pct, r + stroke * 1.2)
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#ffffff" '
            f'stroke-width="{size_px / 90:.1f}" stroke-dasharray="{size_px / 80:.1f}"/>'
        )
    if quota.actual_pct is not None:
        nx, ny = point(quota.actual_pct, r * 0.92)
        parts.append(
            f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{nx:.1f}" y2="{ny:.1f}" stroke="#ffffff" '
            f'stroke-width="{size_px / 70:.1f}" stroke-linecap="round"/>'
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{size_px / 40:.1f}" fill="#ffffff"/>'
        )
    font = size_px / 14
    actual = format_number(quota.actual_pct, 0)
    forecast = format_number(forecast_pct, 0)
    parts.append(
        f'<text x="{cx:.1f}" y="{cy + font * 1.3:.1f}" fill="#ffffff" font-size="{font * 1.2:.0f}" '
        f'text-anchor="middle" font-weight="600">{esc(t("actual", lang))} {actual}%</text>'
        f'<text x="{cx:.1f}" y="{cy + font * 2.5:.1f}" fill="{TEXT}" font-size="{font * 0.8:.0f}" '
        f'text-anchor="middle">{esc(t("forecast", lang))} {forecast}% · {esc(t("quota", lang))} '
        f"{format_number(quota.quota_t, 0)} t</text>"
    )
    return (
        f'<svg width="{width:.0f}" height="{height + font * 2.8:.0f}" data-gauge="{actual}">'
        + "".join(parts)
        + "</svg>"
    )


class BigScreen:
    """One big-screen session: builds the panes and refreshes them from the data layer's snapshot."""

    def __init__(
        self,
        layer: DataLayer,
        *,
        lang: Lang,
        layout: Layout,
        rotate_s: float = DEFAULT_ROTATE_S,
        first_view: str = VIEWS[0],
    ) -> None:
        if first_view not in VIEWS:
            raise ValueError(f"first_view: one of {', '.join(VIEWS)}, not {first_view!r}")
        self.layer, self.lang, self.layout = layer, lang, layout
        self.rotate_s = max(3.0, rotate_s)
        self._first_view = VIEWS.index(first_view)
        s = layout.scale
        self._css = [panel_css(s)]
        self._seen_version = -1
        self._last_html: dict[int, str] = {}
        width = layout.width_px - int(40 * s)
        self._header = self._html(height=int(70 * s), width=width)
        self._kpis = self._html(height=int(150 * s), width=width)
        self._banner = self._html(height=int(64 * s), width=width)
        main_h = int(layout.height_px - (70 + 150 + 64 + 40 + 70) * s)
        self._main_h = main_h
        self._gauge = self._html(height=main_h, width=int(560 * s))
        self._curve_source = ColumnDataSource({"x": [], "y": []})
        self._forecast_source = ColumnDataSource({"x": [], "y": []})
        self._band_source = ColumnDataSource({"x": [], "low": [], "high": []})
        self._curve, self._quota_span = self._curve_figure(width=int(860 * s), height=main_h)
        self._scopes = self._html(height=main_h, width=int(420 * s))
        self._by_enterprise = self._html(height=main_h, width=int(610 * s))
        self._emitters = self._html(height=main_h, width=int(610 * s))
        self._pv = self._html(height=main_h, width=int(600 * s))
        self._dispatches = self._html(height=main_h, width=int(920 * s))
        self._alarm_list = self._html(height=main_h, width=int(920 * s))
        gap = {"gap": f"{int(20 * s)}px"}
        curve_card = pn.Column(
            self._curve, styles={"background": CARD, "border-radius": f"{int(8 * s)}px"}, margin=0
        )
        self._views = [
            pn.Row(self._gauge, curve_card, self._scopes, styles=gap, margin=0),
            pn.Row(self._by_enterprise, self._emitters, self._pv, styles=gap, margin=0),
            pn.Row(self._dispatches, self._alarm_list, styles=gap, margin=0),
        ]
        self._view_names = [f"view_{name}" for name in VIEWS]
        self._dots = self._html(height=int(30 * s), width=width)
        self._view = -1
        self._started = time.monotonic()
        self.panel = pn.Column(
            self._header,
            self._kpis,
            self._banner,
            *self._views,
            self._dots,
            width=layout.width_px,
            height=layout.height_px,
            styles={"padding": f"{int(20 * s)}px", "gap": f"{int(12 * s)}px", "box-sizing": "border-box"},
            margin=0,
        )
        self.update()

    def _html(self, *, height: int, width: int) -> pn.pane.HTML:
        return pn.pane.HTML("", height=height, width=width, stylesheets=self._css, margin=0)

    def _set(self, pane: pn.pane.HTML, html: str) -> None:
        if self._last_html.get(id(pane)) != html:
            self._last_html[id(pane)] = html
            pane.object = html

    def _curve_figure(self, *, width: int, height: int) -> tuple[Any, Span]:
        s = self.layout.scale
        fig = figure(
            width=width,
            height=height,
            x_axis_type="datetime",
            toolbar_location=None,
            title=t("co2_month", self.lang) + " (tCO2e)",
            background_fill_color=CARD,
            border_fill_color=CARD,
            outline_line_color=None,
        )
        assert isinstance(fig.title, Title)
        fig.title.text_color = TEXT
        fig.title.text_font_size = f"{int(18 * s)}px"
        for axis in (fig.xaxis, fig.yaxis):
            axis.major_label_text_color = MUTED
            axis.major_label_text_font_size = f"{int(13 * s)}px"
            axis.axis_line_color = "#1f3d55"
            axis.major_tick_line_color = "#1f3d55"
            axis.minor_tick_line_color = None
        fig.xaxis.formatter = DatetimeTickFormatter(days="%m-%d", months="%m-%d")
        fig.grid.grid_line_color = "#15324a"
        fig.varea(
            "x",
            "low",
            "high",
            source=self._band_source,
            fill_color="#9fd3ff",
            fill_alpha=0.25,
            legend_label=t("forecast_interval", self.lang),
        )
        fig.line(
            "x",
            "y",
            source=self._forecast_source,
            line_color="#9fd3ff",
            line_dash="dashed",
            line_width=2 * s,
            legend_label=t("forecast", self.lang),
        )
        fig.line(
            "x",
            "y",
            source=self._curve_source,
            line_color=ACCENT,
            line_width=3 * s,
            legend_label=t("actual", self.lang),
        )
        span = Span(location=0, dimension="width", line_color=DANGER, line_width=2 * s, visible=False)
        fig.add_layout(span)
        fig.legend.location = "top_left"
        fig.legend.background_fill_color = CARD
        fig.legend.background_fill_alpha = 0.7
        fig.legend.label_text_color = TEXT
        fig.legend.label_text_font_size = f"{int(14 * s)}px"
        fig.legend.border_line_color = None
        return fig, span

    # ---- the periodic callback ------------------------------------------------------------------

    def update(self) -> None:
        """Refresh the clock and rotation every call, the rest when the snapshot changed."""
        snap = self.layer.snapshot
        self._render_header(snap)
        self._rotate()
        if snap.version == self._seen_version:
            return
        self._seen_version = snap.version
        self._render_kpis(snap)
        self._render_banner(snap)
        self._render_carbon(snap)
        self._render_energy(snap)
        self._render_operations(snap)

    def _rotate(self) -> None:
        turns = int((time.monotonic() - self._started) // self.rotate_s)
        view = (self._first_view + turns) % len(self._views)
        if view == self._view:
            return
        self._view = view
        for index, row in enumerate(self._views):
            row.visible = index == view
        dots = "".join(
            f'<span class="{"on" if i == view else ""}">{"●" if i == view else "○"} '
            f"{esc(t(name, self.lang))}</span>"
            for i, name in enumerate(self._view_names)
        )
        self._set(self._dots, f'<div class="dots">{dots}</div>')

    def _render_header(self, snap: Snapshot) -> None:
        now = datetime.now(UTC)
        zone = snap.zone
        live = "on" if snap.live else "off"
        status = t("connected" if snap.live else "disconnected", self.lang)
        self._set(
            self._header,
            '<div class="header"><div><span class="title">'
            f"{esc(t('title_bigscreen', self.lang))}</span>"
            f'<span class="subtitle">{esc(snap.site_name)}</span></div>'
            f'<div><span class="clock">{format_date(now, self.lang, zone)} '
            f"{format_time(now, zone, seconds=True)}</span>"
            f'<span class="live {live}">● {esc(status)}</span></div></div>',
        )

    def _kpi(self, key: str, title: str, value: str, unit: str, sub: str = "") -> str:
        return (
            f'<div class="card" style="flex:1" data-kpi="{esc(key)}">'
            f'<div class="card-title">{esc(title)}</div>'
            f'<span class="kpi-value">{value}</span><span class="kpi-unit">{esc(unit)}</span>'
            f'<div class="kpi-sub">{esc(sub)}</div></div>'
        )

    def _render_kpis(self, snap: Snapshot) -> None:
        lang = self.lang
        total = [node_power_kw(snap, root) for root in snap.roots]
        values = [v for v in total if v is not None]
        cards = [
            self._kpi(
                "power-total",
                t("power_total", lang),
                format_number(sum(values) if values else None),
                "kW",
                t("power", lang),
            )
        ]
        cards.extend(
            self._kpi(
                f"power-{node.id}",
                node.name,
                format_number(node_power_kw(snap, node.id)),
                "kW",
                t("enterprise", lang),
            )
            for node in snap.nodes_at("enterprise")[:MAX_ENTERPRISE_CARDS]
        )
        cards.append(
            self._kpi("energy-today", t("energy_today", lang), format_number(snap.energy_today_kwh, 0), "kWh")
        )
        cards.append(
            self._kpi(
                "co2-today",
                t("co2_today", lang),
                format_number(snap.today.total_t if snap.today else None, 2),
                "tCO2e",
            )
        )
        cards.append(
            self._kpi(
                "co2-month",
                t("co2_month", lang),
                format_number(snap.month.total_t if snap.month else None, 1),
                "tCO2e",
            )
        )
        gap = f"{12 * self.layout.scale:.0f}px"
        self._set(self._kpis, f'<div style="display:flex;gap:{gap};height:100%">{"".join(cards)}</div>')

    def _render_banner(self, snap: Snapshot) -> None:
        active = banner_order(snap.alarms)
        if not active:
            self._set(self._banner, f'<div class="banner ok">✓ {esc(t("no_alarms", self.lang))}</div>')
            return
        zone = snap.zone
        chips = "".join(
            f'<div class="chip" data-alarm="{esc(a.alarm)}" '
            f'style="border-color:{PRIORITY_COLOURS.get(a.priority, MUTED)}">'
            f'<span class="when">{format_time(a.since, zone)}</span>'
            f'<span class="prio" style="background:{PRIORITY_COLOURS.get(a.priority, MUTED)}">'
            f"{esc(t(f'prio_{a.priority}', self.lang) if 1 <= a.priority <= 4 else a.priority)}</span> "
            f"{esc(a.message)}</div>"
            for a in active[:BANNER_ALARMS]
        )
        more = len(active) - BANNER_ALARMS
        extra = (
            f'<div class="chip" style="flex:0 0 auto;border-color:{MUTED}">+{more}</div>' if more > 0 else ""
        )
        self._set(self._banner, f'<div class="banner">{chips}{extra}</div>')

    def _render_carbon(self, snap: Snapshot) -> None:
        lang, s = self.lang, self.layout.scale
        quota = snap.month_quota()
        self._set(
            self._gauge,
            f'<div class="card"><div class="card-title">{esc(t("quota_gauge", lang))}</div>'
            f"{gauge_svg(quota, lang, size_px=500 * s)}</div>",
        )
        self._update_curve(snap, quota)
        month = snap.month
        if month is None or month.total_t <= 0:
            body = f'<div class="empty">{esc(t("no_data", lang))}</div>'
        else:
            rows = []
            for key, value, colour in (("scope1", month.scope1_t, WARN), ("scope2", month.scope2_t, ACCENT)):
                share = 100.0 * value / month.total_t
                rows.append(
                    f'<div style="margin-top:{24 * s:.0f}px"><div>{esc(t(key, lang))}</div>'
                    f'<div class="big" style="color:{colour}">{format_number(share, 1)}%</div>'
                    f'<div class="muted">{format_number(value, 2)} tCO2e</div>'
                    f'<div class="bar-track" style="margin:{6 * s:.0f}px 0"><div class="bar-fill" '
                    f'style="width:{share:.1f}%;background:{colour}"></div></div></div>'
                )
            body = "".join(rows)
        self._set(
            self._scopes,
            f'<div class="card"><div class="card-title">{esc(t("scope_split", lang))}</div>{body}</div>',
        )

    def _update_curve(self, snap: Snapshot, quota: QuotaView | None) -> None:
        xs: list[datetime] = []
        ys: list[float] = []
        total = 0.0
        now = datetime.now(UTC)
        for start, value in snap.daily_t:
            if not xs:
                xs.append(start)
                ys.append(0.0)
            total += value
            xs.append(min(start + timedelta(days=1), now))
            ys.append(total)
        self._curve_source.data = {"x": xs, "y": ys}
        root = snap.roots[0] if snap.roots else None
        forecast = snap.forecasts.get(root) if root is not None else None
        if forecast is not None and xs:
            local = now.astimezone(snap.zone)
            next_month = (local.replace(day=28) + timedelta(days=4)).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
            end = next_month.astimezone(UTC)
            self._forecast_source.data = {"x": [xs[-1], end], "y": [ys[-1], forecast.forecast_t]}
            self._band_source.data = {
                "x": [xs[-1], end],
                "low": [ys[-1], forecast.low_t],
                "high": [ys[-1], forecast.high_t],
            }
        else:
            self._forecast_source.data = {"x": [], "y": []}
            self._band_source.data = {"x": [], "low": [], "high": []}
        if quota is not None:
            self._quota_span.location = quota.quota_t
            self._quota_span.visible = True
        else:
            self._quota_span.visible = False

    def _bars(self, rows: Sequence[tuple[str, float | None, str]], unit: str, digits: int) -> str:
        peak = max((v for _, v, _ in rows if v is not None and v > 0), default=0.0)
        out = []
        for label, value, key in rows:
            width = 100.0 * value / peak if value is not None and peak > 0 and value > 0 else 0.0
            out.append(
                f'<div class="bar-row" data-row="{esc(key)}"><span class="bar-label">{esc(label)}</span>'
                f'<span class="bar-track"><div class="bar-fill" style="width:{width:.1f}%"></div></span>'
                f'<span class="bar-value">{format_number(value, digits)} {esc(unit)}</span></div>'
            )
        return "".join(out)

    def _render_energy(self, snap: Snapshot) -> None:
        lang = self.lang
        enterprises = [(n.name, node_power_kw(snap, n.id), n.id) for n in snap.nodes_at("enterprise")]
        body = self._bars(enterprises, "kW", 1) or f'<div class="empty">{esc(t("no_data", lang))}</div>'
        self._set(
            self._by_enterprise,
            f'<div class="card"><div class="card-title">{esc(t("power", lang))}</div>{body}</div>',
        )
        emitters = [(n.name, value, n.id) for n, value in top_emitters(snap, count=8)]
        body = self._bars(emitters, "tCO2e", 2) or f'<div class="empty">{esc(t("no_data", lang))}</div>'
        self._set(
            self._emitters,
            f'<div class="card"><div class="card-title">{esc(t("top_emitters", lang))}</div>{body}</div>',
        )
        status = storage_status(snap)
        battery = status.battery_kw
        mode = (
            "idle"
            if battery is None or abs(battery) < 0.5
            else ("discharging" if battery > 0 else "charging")
        )
        soc = status.soc_pct
        soc_bar = (
            f'<div class="bar-track" style="margin:8px 0"><div class="bar-fill" '
            f'style="width:{min(max(soc, 0), 100):.1f}%"></div></div>'
            if soc is not None
            else ""
        )
        self._set(
            self._pv,
            f'<div class="card"><div class="card-title">{esc(t("pv_storage", lang))}</div>'
            f'<div data-kpi="pv"><div class="muted">{esc(t("pv_power", lang))} ({status.pv_devices})</div>'
            f'<span class="big">{format_number(status.pv_kw, 1)}</span><span class="kpi-unit">kW</span></div>'
            f'<div data-kpi="battery" style="margin-top:20px">'
            f'<div class="muted">{esc(t("battery_power", lang))} '
            f'({status.batteries})</div><span class="big">{format_number(battery, 1)}</span>'
            f'<span class="kpi-unit">kW · {esc(t(mode, lang))}</span></div>'
            f'<div data-kpi="soc" style="margin-top:20px"><div class="muted">{esc(t("soc", lang))}</div>'
            f'<span class="big">{format_number(soc, 0)}</span><span class="kpi-unit">%</span>'
            f"{soc_bar}</div></div>",
        )

    def _render_operations(self, snap: Snapshot) -> None:
        lang = self.lang
        latest = sorted(snap.dispatches, key=lambda d: d.id, reverse=True)[:MAX_DISPATCH_ROWS]
        if latest:
            zone = snap.zone
            lines: list[str] = []
            for d in latest:
                info = snap.points.get(d.point)
                unit = info.unit if info else ""
                state = t_or(f"dstate_{d.state}", lang, d.state)
                measured = "measured" if d.co2e_avoided_t is not None else "pending"
                lines.append(
                    f'<tr data-dispatch="{d.id}" data-state="{esc(d.state)}">'
                    f"<td>{format_time(d.created_at, zone)}</td>"
                    f'<td class="dstate-{esc(d.state)}">{esc(state)}</td>'
                    f"<td>{esc(point_label(snap, d.point))}</td>"
                    f'<td style="text-align:right"><b>{d.value:g}</b> {esc(unit)}</td>'
                    f'<td data-effect="{measured}">{esc(dispatch_effect(d, lang))}</td></tr>'
                )
            body = f'<table class="list">{"".join(lines)}</table>'
        else:
            body = f'<div class="empty" data-empty="dispatches">{esc(t("no_dispatches", lang))}</div>'
        cut = snap.dispatch_cut
        total = ""
        if cut is not None:
            text = t(
                "month_cut",
                lang,
                value=format_number(cut.co2e_avoided_t, 2),
                pm=format_number(cut.co2e_uncertainty_t, 2),
                n=cut.measured,
            )
            total = f'<div class="muted" data-kpi="month-cut">{esc(text)}</div>'
        title = f'<div class="card-title">{esc(t("dispatches", lang))}</div>'
        self._set(self._dispatches, f'<div class="card">{title}{total}{body}</div>')
        active = banner_order(snap.alarms)
        if active:
            zone = snap.zone
            rows = "".join(
                f'<tr><td>{format_time(a.since, zone)}</td><td><span class="prio" '
                f'style="background:{PRIORITY_COLOURS.get(a.priority, MUTED)}">{a.priority}</span></td>'
                f'<td class="state-{esc(a.state)}">{esc(t(f"state_{a.state}", lang))}</td>'
                f"<td>{esc(a.message)}</td></tr>"
                for a in active[:14]
            )
            body = f'<table class="list">{rows}</table>'
        else:
            body = f'<div class="empty">{esc(t("no_alarms", lang))}</div>'
        self._set(
            self._alarm_list,
            f'<div class="card"><div class="card-title">{esc(t("alarms", lang))}</div>{body}</div>',
        )
