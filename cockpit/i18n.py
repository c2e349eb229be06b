"""Interface text in Chinese (the default) and English, and number and date formats to match.

Every label the cockpits show comes from :data:`TEXT`, so a screen never mixes languages. Dates
and times are shown in the site's time zone (``/api/v1/site``), never the browser's.

Example
-------
>>> t("power", "en")
'Live power'
>>> format_number(1234.5, 1)
'1,234.5'
>>> from datetime import datetime, timezone
>>> format_date(datetime(2026, 11, 21, 4, 30, tzinfo=timezone.utc), "zh")
'2026年11月21日'
>>> format_date(datetime(2026, 11, 21, 4, 30, tzinfo=timezone.utc), "en")
'21 Nov 2026'
"""

from __future__ import annotations

import enum
import math
from datetime import datetime, tzinfo

__all__ = [
    "NO_VALUE",
    "TEXT",
    "Lang",
    "format_date",
    "format_number",
    "format_time",
    "parse_lang",
    "t",
    "t_or",
]


class Lang(enum.StrEnum):
    """An interface language."""

    ZH = "zh"
    EN = "en"


TEXT: dict[str, tuple[str, str]] = {
    # key: (Chinese, English)
    "title_bigscreen": ("碳排放与能源监控中心", "Carbon and energy control room"),
    "title_cockpit": ("运行驾驶舱", "Operator cockpit"),
    "power": ("实时功率", "Live power"),
    "power_total": ("总功率", "Total power"),
    "energy_today": ("今日用电 (电网购入)", "Energy today (grid import)"),
    "co2_today": ("今日排放", "Emissions today"),
    "co2_month": ("本月排放", "Emissions this month"),
    "quota": ("本月配额", "Monthly quota"),
    "quota_gauge": ("配额执行 (实际 / 预测)", "Quota use (actual / forecast)"),
    "actual": ("实际", "Actual"),
    "forecast": ("预测", "Forecast"),
    "forecast_interval": ("预测区间", "Forecast interval"),
    "no_quota": ("本月未设置配额", "No quota set for this month"),
    "no_forecast": ("暂无预测", "No forecast yet"),
    "scope_split": ("范围一 / 范围二", "Scope 1 / Scope 2"),
    "scope1": ("范围一 (直接排放)", "Scope 1 (direct)"),
    "scope2": ("范围二 (外购电力热力)", "Scope 2 (purchased energy)"),
    "top_emitters": ("排放排行 (本月)", "Top emitters (this month)"),
    "pv_storage": ("光伏与储能", "PV and battery"),
    "pv_power": ("光伏发电", "PV output"),
    "battery_power": ("储能功率", "Battery power"),
    "soc": ("荷电状态", "State of charge"),
    "charging": ("充电", "charging"),
    "discharging": ("放电", "discharging"),
    "idle": ("待机", "idle"),
    "alarms": ("报警", "Alarms"),
    "no_alarms": ("无活动报警", "No active alarms"),
    "dispatches": ("最新调度", "Latest dispatches"),
    "no_dispatches": ("暂无调度", "No dispatches yet"),
    "dispatch_queue": ("调度审批队列", "Dispatch queue"),
    "cut_co2": ("减排 {value} tCO2e", "cut {value} t CO2"),
    "month_cut": (
        "本月调度实测减排 {value} ± {pm} tCO2e ({n} 次)",
        "this month's dispatches cut {value} ± {pm} t CO2 ({n} measured)",
    ),
    "expected_kw": ("预期削减 {value} kW", "expected {value} kW"),
    "effect_pending": ("效果待核验", "effect to be verified"),
    "no_waiting": ("无待审批调度", "Nothing awaiting approval"),
    "decision_comment": ("审批意见", "Comment"),
    "approve": ("批准", "Approve"),
    "reject": ("驳回", "Reject"),
    "dispatch_n": ("调度 #{id}", "Dispatch #{id}"),
    "col_time": ("时间", "Time"),
    "col_point": ("测点 → 设定值", "Point → value"),
    "col_rule": ("规则 / 阶段", "Rule / stage"),
    "col_expected": ("预期 kW", "Expected kW"),
    "col_result": ("结果", "Result"),
    "stage_n": ("阶段 {n}", "stage {n}"),
    "readback": ("回读 {value}", "read back {value}"),
    "attempts": ("{n} 次尝试", "{n} attempts"),
    "decided_by": ("审批人 {who}", "by {who}"),
    "dstate_advisory": ("仅建议", "advisory"),
    "dstate_awaiting_approval": ("待审批", "awaiting approval"),
    "dstate_approved": ("已批准", "approved"),
    "dstate_rejected": ("已驳回", "rejected"),
    "dstate_sending": ("下发中", "sending"),
    "dstate_verified": ("已核验", "verified"),
    "dstate_failed": ("失败", "failed"),
    "dstate_reverting": ("恢复中", "reverting"),
    "dstate_reverted": ("已恢复", "reverted"),
    "dstate_revert_failed": ("恢复失败", "revert failed"),
    "no_data": ("暂无数据", "No data"),
    "offline": ("离线", "offline"),
    "online": ("在线", "online"),
    "stale": ("数据陈旧", "stale"),
    "unknown": ("未知", "unknown"),
    "connected": ("实时连接", "live"),
    "disconnected": ("连接中断", "disconnected"),
    "updated": ("更新于", "updated"),
    "login": ("登录", "Sign in"),
    "logout": ("退出", "Sign out"),
    "tenant": ("租户", "Tenant"),
    "username": ("用户名", "Username"),
    "password": ("密码", "Password"),
    "login_failed": ("登录失败", "Sign-in failed"),
    "hierarchy": ("层级", "Hierarchy"),
    "up": ("上一级", "Up"),
    "children": ("下级", "Below"),
    "points": ("测点", "Points"),
    "trend": ("趋势 (最近 24 小时)", "Trend (last 24 h)"),
    "select_point": ("选择测点以查看趋势", "Select a point to see its trend"),
    "alarm_list": ("报警列表", "Alarm list"),
    "alarm": ("报警", "Alarm"),
    "priority": ("优先级", "Priority"),
    "state": ("状态", "State"),
    "since": ("时间", "Since"),
    "message": ("信息", "Message"),
    "comment": ("备注", "Comment"),
    "reason": ("原因", "Reason"),
    "acknowledge": ("确认", "Acknowledge"),
    "shelve": ("搁置", "Shelve"),
    "shelve_for": ("搁置时长", "Shelve for"),
    "select_alarm": ("选择报警", "Select an alarm"),
    "action_done": ("已完成: {what}", "Done: {what}"),
    "action_failed": ("操作失败: {detail}", "Failed: {detail}"),
    "reason_required": ("请填写搁置原因", "Give a reason to shelve"),
    "manual_commands": ("手动指令", "Manual commands"),
    "select_writable": ("在层级中选择可写测点以下发指令", "Choose a writable point in the hierarchy"),
    "read_only": ("该测点只读, 不能下发指令", "This point is read-only"),
    "writable": ("可写", "writable"),
    "command_value": ("设定值", "Value"),
    "command_reason": ("原因 (选填)", "Reason (optional)"),
    "send": ("下发…", "Send…"),
    "confirm": ("确认下发", "Confirm"),
    "cancel": ("取消", "Cancel"),
    "confirm_write": ("确认将 {value} {unit} 写入 {point}?", "Write {value} {unit} to {point}?"),
    "sending": ("下发中, 等待回读…", "Sending, waiting for the read-back…"),
    "value_invalid": ("设定值: 请输入一个数字", "Value: enter a number"),
    "cancelled": ("已取消, 未下发", "Cancelled, nothing sent"),
    "cstatus_verified": ("已核验", "verified"),
    "cstatus_mismatch": ("回读不一致", "read-back mismatch"),
    "cstatus_rejected": ("设备拒绝", "rejected by the device"),
    "cstatus_timeout": ("设备无应答", "timed out"),
    "cstatus_failed": ("失败", "failed"),
    "view_carbon": ("碳排放", "Carbon"),
    "view_energy": ("能源", "Energy"),
    "view_operations": ("运行", "Operations"),
    "enterprise": ("企业", "Enterprise"),
    "level_group": ("集团", "Group"),
    "level_park": ("园区", "Park"),
    "level_enterprise": ("企业", "Enterprise"),
    "level_workshop": ("车间", "Workshop"),
    "level_device": ("设备", "Device"),
    "level_point": ("测点", "Point"),
    "state_active_unack": ("活动未确认", "active, unacknowledged"),
    "state_active_ack": ("活动已确认", "active, acknowledged"),
    "state_rtn_unack": ("已恢复未确认", "returned, unacknowledged"),
    "state_shelved": ("已搁置", "shelved"),
    "state_suppressed_by_design": ("已抑制", "suppressed"),
    "state_out_of_service": ("已停用", "out of service"),
    "state_normal": ("正常", "normal"),
    "prio_1": ("紧急", "critical"),
    "prio_2": ("高", "high"),
    "prio_3": ("中", "medium"),
    "prio_4": ("低", "low"),
    "minutes": ("{n} 分钟", "{n} min"),
    "hours": ("{n} 小时", "{n} h"),
    "error_token": ("缺少访问令牌 (?token= 或 CARBONOS_TOKEN)", "No token (?token= or CARBONOS_TOKEN)"),
}

NO_VALUE = "\u2013"
"""What a missing or bad value shows (an en dash)."""

_MONTHS_EN = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_lang(raw: str | None) -> Lang:
    """Return the language a query parameter names; Chinese for anything else.

    >>> parse_lang("en"), parse_lang(None), parse_lang("fr")
    (<Lang.EN: 'en'>, <Lang.ZH: 'zh'>, <Lang.ZH: 'zh'>)
    """
    return Lang.EN if raw == Lang.EN.value else Lang.ZH


def t(key: str, lang: Lang | str, **values: object) -> str:
    """Return the text of ``key`` in ``lang``, formatted with ``values``; KeyError names a missing key."""
    zh, en = TEXT[key]
    text = en if lang == Lang.EN else zh
    return text.format(**values) if values else text


def t_or(key: str, lang: Lang | str, fallback: str) -> str:
    """Return the text of ``key`` in ``lang``, or ``fallback`` when there is none (a server's new state).

    >>> t_or("dstate_verified", "en", "verified"), t_or("dstate_new_state", "en", "new_state")
    ('verified', 'new_state')
    """
    return t(key, lang) if key in TEXT else fallback


def format_number(value: float | None, digits: int = 1) -> str:
    """Return ``value`` with thousands separators and ``digits`` decimals (both languages); a dash if none.

    >>> format_number(None), format_number(-0.04, 1), format_number(12.0, 0)
    ('\u2013', '0.0', '12')
    """
    if value is None or not math.isfinite(value):
        return NO_VALUE
    text = f"{value:,.{digits}f}"
    return text[1:] if text.startswith("-") and float(text[1:].replace(",", "")) == 0 else text


def format_date(ts: datetime, lang: Lang | str, zone: tzinfo | None = None) -> str:
    """Return the calendar date of ``ts`` in ``zone`` (or its own zone): 2026年11月21日 / 21 Nov 2026."""
    local = ts.astimezone(zone) if zone is not None else ts
    if lang == Lang.EN:
        return f"{local.day} {_MONTHS_EN[local.month - 1]} {local.year}"
    return f"{local.year}年{local.month}月{local.day}日"


def format_time(ts: datetime, zone: tzinfo | None = None, *, seconds: bool = False) -> str:
    """Return the wall-clock time of ``ts`` in ``zone``: 12:30 (or 12:30:05).

    >>> from datetime import timezone
    >>> format_time(datetime(2026, 11, 21, 4, 30, 5, tzinfo=timezone.utc), seconds=True)
    '04:30:05'
    """
    local = ts.astimezone(zone) if zone is not None else ts
    return local.strftime("%H:%M:%S" if seconds else "%H:%M")
