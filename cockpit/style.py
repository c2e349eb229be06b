"""Shared look of the cockpits: a dark control-room palette, CSS scaled for 1080p and 2160p screens."""

from __future__ import annotations

from html import escape

__all__ = ["BODY_CSS", "PRIORITY_COLOURS", "esc", "panel_css"]

BACKGROUND = "#071521"
CARD = "#0d2233"
TEXT = "#d8e6f0"
MUTED = "#7f9bb0"
ACCENT = "#2fd3a6"
WARN = "#f5b83d"
DANGER = "#ff5d5d"
PRIORITY_COLOURS = {1: "#ff4d4f", 2: "#ff8c3a", 3: "#f5c542", 4: "#4ea3ff"}
FONT = '"WenQuanYi Micro Hei", "Noto Sans CJK SC", "Microsoft YaHei", "PingFang SC", sans-serif'

BODY_CSS = f"""
html, body {{ margin: 0; padding: 0; background: {BACKGROUND}; color: {TEXT}; font-family: {FONT}; }}
"""


def esc(text: object) -> str:
    """Escape text for HTML (names and messages come from configuration and devices)."""
    return escape(str(text), quote=True)


def panel_css(scale: float = 1.0) -> str:
    """Return the stylesheet of the cockpit's HTML panes, with sizes multiplied by ``scale``."""

    def px(value: float) -> str:
        return f"{value * scale:.0f}px"

    return f"""
:host {{ color: {TEXT}; font-family: {FONT}; }}
.card {{ background: {CARD}; border-radius: {px(8)}; padding: {px(14)} {px(18)}; box-sizing: border-box;
        height: 100%; overflow: hidden; border: 1px solid #16364d; }}
.card-title {{ color: {MUTED}; font-size: {px(18)}; margin-bottom: {px(8)}; letter-spacing: 0.05em; }}
.kpi-value {{ font-size: {px(40)}; font-weight: 600; color: #ffffff; font-variant-numeric: tabular-nums; }}
.kpi-unit {{ font-size: {px(18)}; color: {MUTED}; margin-left: {px(6)}; }}
.kpi-sub {{ font-size: {px(15)}; color: {MUTED}; margin-top: {px(4)}; }}
.title {{ font-size: {px(34)}; font-weight: 600; color: #ffffff; }}
.subtitle {{ font-size: {px(18)}; color: {MUTED}; margin-left: {px(16)}; }}
.clock {{ font-size: {px(26)}; color: #ffffff; font-variant-numeric: tabular-nums; }}
.live {{ font-size: {px(16)}; margin-left: {px(14)}; }}
.live.on {{ color: {ACCENT}; }} .live.off {{ color: {DANGER}; }}
.header {{ display: flex; align-items: center; justify-content: space-between; height: 100%; }}
.banner {{ display: flex; gap: {px(12)}; align-items: stretch; height: 100%; }}
.chip {{ flex: 1; border-radius: {px(6)}; padding: {px(8)} {px(12)}; background: #1a2c3b;
        border-left: {px(8)} solid; font-size: {px(17)}; overflow: hidden; white-space: nowrap;
        text-overflow: ellipsis; }}
.chip .when {{ color: {MUTED}; margin-right: {px(8)}; }}
.ok {{ color: {ACCENT}; font-size: {px(20)}; display: flex; align-items: center; }}
.bar-row {{ display: flex; align-items: center; margin: {px(10)} 0; font-size: {px(18)}; }}
.bar-label {{ width: 38%; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
.bar-track {{ flex: 1; height: {px(18)}; background: #132c40; border-radius: {px(4)}; margin: 0 {px(10)}; }}
.bar-fill {{ height: 100%; border-radius: {px(4)}; background: {ACCENT}; }}
.bar-value {{ width: 28%; text-align: right; font-variant-numeric: tabular-nums; }}
.empty {{ color: {MUTED}; font-size: {px(22)}; text-align: center; margin-top: {px(60)}; }}
.big {{ font-size: {px(34)}; font-weight: 600; color: #fff; }}
.muted {{ color: {MUTED}; }}
.dots {{ display: flex; gap: {px(18)}; justify-content: center; font-size: {px(16)}; color: {MUTED}; }}
.dots .on {{ color: #ffffff; }}
table.list {{ width: 100%; border-collapse: collapse; font-size: {px(15)}; }}
table.list th {{ text-align: left; color: {MUTED}; font-weight: normal; border-bottom: 1px solid #1f3d55;
                padding: {px(4)} {px(6)}; }}
table.list td {{ padding: {px(5)} {px(6)}; border-bottom: 1px solid #13293a; vertical-align: top; }}
.prio {{ display: inline-block; min-width: {px(34)}; text-align: center; border-radius: {px(4)};
        color: #071521; font-weight: 600; padding: 0 {px(4)}; }}
.state-active_unack {{ color: {DANGER}; font-weight: 600; }}
.state-active_ack {{ color: {WARN}; }}
.state-rtn_unack {{ color: #9fd3ff; }}
.feedback-ok {{ color: {ACCENT}; }} .feedback-error {{ color: {DANGER}; }}
.dstate-awaiting_approval {{ color: {WARN}; font-weight: 600; }}
.dstate-verified, .dstate-reverted {{ color: {ACCENT}; }}
.dstate-failed, .dstate-revert_failed {{ color: {DANGER}; font-weight: 600; }}
.dstate-rejected, .dstate-advisory {{ color: {MUTED}; }}
.dstate-sending, .dstate-approved, .dstate-reverting {{ color: #9fd3ff; }}
table.list tr.sub td {{ color: {MUTED}; font-size: {px(13)}; padding-top: 0; }}
table.list tr:has(+ tr.sub) td {{ border-bottom: none; }}
.crumbs {{ font-size: {px(15)}; color: {MUTED}; }} .crumbs b {{ color: #fff; }}
"""
