"""Alarm definitions and detector monitors from the site file (docs/alarms.md, docs/anomaly-detection.md).

Every device gets a ``device_offline`` alarm; every point's ``alarms:`` become limit alarms; every
point's ``anomaly:`` becomes a detector monitor and the ``deviation`` alarm it drives; every point
the control section writes gets a ``dispatch_failed`` alarm, raised when a dispatch to it fails. Alarms
annunciate on their enterprise's console (the operators of one plant), or on their node's when the
device hangs above enterprise level.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from anomaly.alarm_model import AlarmDefinition, AlarmPriority, ConditionKind, DeadbandUnit
from anomaly.detectors import DetectorSpec, PointMonitor
from anomaly.service import DISPATCH_ALARM_SUFFIX, MonitoredPoint
from control_engine.factors import FactorLibrary
from scada.catalog import node_tree
from scada.config import DeviceConfig, SiteConfig
from scada.model import Carrier, NodeId, NodeLevel, PointKind, Unit, make_point_id

__all__ = [
    "ANOMALY_SUFFIX",
    "DISPATCH_SUFFIX",
    "OFFLINE_SUFFIX",
    "alarm_definitions",
    "consoles_by_node",
    "monitored_points",
]

OFFLINE_SUFFIX = ":offline"
ANOMALY_SUFFIX = ":anomaly"
DISPATCH_SUFFIX = DISPATCH_ALARM_SUFFIX


def consoles_by_node(site: SiteConfig) -> dict[NodeId, str]:
    """Return the console of each node: its nearest enterprise (or itself above enterprise level)."""
    parents, levels = node_tree(site)
    enterprise: dict[NodeId, NodeId | None] = {}
    for node, parent in parents.items():  # parents come before their children
        if levels[node] is NodeLevel.ENTERPRISE:
            enterprise[node] = node
        else:
            enterprise[node] = None if parent is None else enterprise[parent]
    return {node: node if above is None else above for node, above in enterprise.items()}


def alarm_definitions(site: SiteConfig) -> list[AlarmDefinition]:
    """Return every alarm the site file implies."""
    consoles = consoles_by_node(site)
    dispatched = (
        {t for rule in site.control.rules for t in rule.targets} if site.control is not None else set()
    )
    out: list[AlarmDefinition] = []
    for device in site.devices:
        console = consoles[NodeId(device.node)]
        out.append(
            AlarmDefinition(
                id=f"{device.id}{OFFLINE_SUFFIX}",
                node=device.node,
                device=device.id,
                console=console,
                kind=ConditionKind.DEVICE_OFFLINE,
                priority=AlarmPriority.MEDIUM,
                message=f"{_name(device)}: 设备离线 device offline",
            )
        )
        for point in device.points:
            point_id = make_point_id(device.id, point.key)
            label = f"{_name(device)} {point.name or point.key}"
            seen: dict[str, int] = {}
            for alarm in point.alarms:
                seen[alarm.kind] = seen.get(alarm.kind, 0) + 1
                suffix = alarm.kind if seen[alarm.kind] == 1 else f"{alarm.kind}{seen[alarm.kind]}"
                out.append(
                    AlarmDefinition(
                        id=f"{point_id}:{suffix}",
                        node=device.node,
                        point=point_id,
                        console=console,
                        kind=ConditionKind(alarm.kind),
                        priority=AlarmPriority.parse(alarm.priority),
                        setpoint=alarm.setpoint,
                        deadband=alarm.deadband,
                        deadband_unit=DeadbandUnit(alarm.deadband_unit),
                        on_delay_s=alarm.on_delay_s,
                        off_delay_s=alarm.off_delay_s,
                        message=alarm.message
                        or f"{label}: {{kind}} {{value:.4g}} {point.unit.value} (limit {{setpoint:g}})",
                    )
                )
            if point_id in dispatched:
                out.append(
                    AlarmDefinition(
                        id=f"{point_id}{DISPATCH_SUFFIX}",
                        node=device.node,
                        device=device.id,  # no point: dispatch outcomes drive it, not the value
                        console=console,
                        kind=ConditionKind.DISPATCH_FAILED,
                        priority=AlarmPriority.HIGH,
                        message=f"{label}: 调度失败 dispatch failed",
                    )
                )
            if point.anomaly is not None:
                out.append(
                    AlarmDefinition(
                        id=f"{point_id}{ANOMALY_SUFFIX}",
                        node=device.node,
                        device=device.id,  # no point: the detector's verdict drives it, not the value
                        console=console,
                        kind=ConditionKind.DEVIATION,
                        priority=AlarmPriority.parse(point.anomaly.priority),
                        on_delay_s=point.anomaly.on_delay_s,
                        off_delay_s=point.anomaly.off_delay_s,
                        message=f"{label}: 异常 anomaly",
                    )
                )
    return out


def monitored_points(site: SiteConfig, factors: FactorLibrary) -> list[MonitoredPoint]:
    """Return a fresh detector monitor for every point with an ``anomaly:`` section."""
    region = site.carbon.grid_region
    out: list[MonitoredPoint] = []
    for device in site.devices:
        for point in device.points:
            if point.anomaly is None:
                continue
            power_kw = point.kind is PointKind.POWER and point.unit is Unit.KW
            electric = power_kw and point.carrier is Carrier.ELECTRICITY
            point_id = make_point_id(device.id, point.key)
            out.append(
                MonitoredPoint(
                    point=point_id,
                    alarm_id=f"{point_id}{ANOMALY_SUFFIX}",
                    monitor=PointMonitor(_spec(point.anomaly.detector, site).build(), power_kw=power_kw),
                    kg_per_kwh=_GridFactor(factors, region) if electric else None,
                )
            )
    return out


class _GridFactor:
    """kgCO2/kWh of the grid in force at a time (cached per day)."""

    def __init__(self, factors: FactorLibrary, region: str) -> None:
        self._factors, self._region = factors, region
        self._cache: dict[int, float] = {}

    def __call__(self, at: datetime) -> float:
        day = int(at.timestamp() // 86_400)
        value = self._cache.get(day)
        if value is None:
            value = self._cache[day] = self._factors.in_force(Carrier.ELECTRICITY, at, self._region).value
        return value


def _spec(raw: Mapping[str, Any], site: SiteConfig) -> DetectorSpec:
    """Return the detector spec, a time-of-day ``profile`` on the site's time zone unless it names one."""
    spec = dict(raw)
    if spec.get("kind") == "profile":
        spec.setdefault("timezone", site.site.timezone)
    return DetectorSpec.from_mapping(spec)


def _name(device: DeviceConfig) -> str:
    return device.name or device.id
