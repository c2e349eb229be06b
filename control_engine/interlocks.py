"""Interlocks: what may be written to a device, whoever proposes it (docs/control.md).

:meth:`Interlocks.clamp` takes one proposal to the value the dispatcher may send, or refuses it;
:meth:`Interlocks.merge_and_clamp` does a whole cycle: one winner per point, then the clamp.

Checks, in order (a refusal stops the chain; a clamp narrows the value and says why):

1. **finite value**, **critical loads** (``control.critical``: never written), **lockout** of the
   device (nothing passes), **manual override** (only ``OPERATOR`` and ``SAFETY`` priorities pass),
   **interlocks configured** for the point and the point **writable**;
2. the **reference**: the last commanded value (``CommandHistory``), else the point's usable value;
   without either nothing is written;
3. **ramp**: within ``max_ramp_per_min x minutes since the last command`` of the reference (one
   minute's worth when nothing was commanded yet);
4. **comfort bands**: while a measured comfort value is above its band, no move of the setpoint that
   raises it further (and below, none that lowers it); an unusable comfort value allows no move;
5. **state-of-charge window** (battery power, + discharge): no discharge at or below ``min_pct``, no
   charge at or above ``max_pct``; an unusable SOC allows only 0 kW;
6. **limits** ``min``/``max``;
7. **minimum on/off times** (value >= 0.5 is on, sent as 1 or 0): a switch is refused until the
   point has been in its state that long; when that time is unknown the switch is refused.

Comfort, SOC and limits come after the ramp so they always hold: stopping a discharge at the SOC
floor is immediate even when the ramp would be slower, and a reference outside the limits (set by
hand) is pulled straight inside them. Pure and synchronous, like :mod:`control_engine.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from control_engine.control_config import ControlConfig, PointInterlock
from control_engine.rules import ON_THRESHOLD, ControlSnapshot, OperatorHoldKind, Proposal
from scada.model import PointId, Priority, split_point_id

__all__ = ["Clamped", "CommandHistory", "CommandRecord", "Dispatch", "Interlocks"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRecord:
    """The last value commanded to a point, when, and when the commanded value last changed."""

    value: float
    ts: datetime
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class CommandHistory:
    """The dispatcher's memory of what it sent, by point id (the ramp and on/off reference)."""

    last: Mapping[str, CommandRecord] = field(default_factory=dict)

    def get(self, point: str) -> CommandRecord | None:
        """Return the last command to a point, or None if none was sent."""
        return self.last.get(point)

    def record(self, point: str, value: float, ts: datetime) -> CommandHistory:
        """Return the history with one more command sent.

        >>> from datetime import UTC, datetime
        >>> t0, t1 = datetime(2026, 3, 9, 8, tzinfo=UTC), datetime(2026, 3, 9, 9, tzinfo=UTC)
        >>> h = CommandHistory().record("b.enabled", 1, t0).record("b.enabled", 1, t1)
        >>> h.get("b.enabled").changed_at == t0
        True
        """
        previous = self.last.get(point)
        changed_at = previous.changed_at if previous is not None and previous.value == value else ts
        return CommandHistory({**self.last, point: CommandRecord(value=value, ts=ts, changed_at=changed_at)})


@dataclass(frozen=True, slots=True, kw_only=True)
class Clamped:
    """What may be sent for one proposal: a value, or a refusal; with every reason that applied."""

    value: float | None
    refused: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """One point's outcome of a cycle: the winning proposal, its clamp, and the proposals it beat."""

    point: PointId
    proposal: Proposal
    clamped: Clamped
    superseded: tuple[Proposal, ...] = ()


class _Refused(Exception):
    """Control flow inside clamp(): the proposal is refused; never escapes."""


class Interlocks:
    """Per-point limits, ramps, on/off times, SOC windows, comfort bands, critical loads, holds."""

    def __init__(self, config: ControlConfig) -> None:
        self._config = config

    def clamp(self, proposal: Proposal, snapshot: ControlSnapshot, history: CommandHistory) -> Clamped:
        """Return the value the dispatcher may send for ``proposal``, or a refusal with the reason."""
        reasons: list[str] = []
        try:
            value = self._clamp(proposal, snapshot, history, reasons)
        except _Refused as refusal:
            return Clamped(value=None, refused=True, reasons=(*reasons, str(refusal)))
        return Clamped(value=value, refused=False, reasons=tuple(reasons))

    def merge_and_clamp(
        self, proposals: Iterable[Proposal], snapshot: ControlSnapshot, history: CommandHistory
    ) -> list[Dispatch]:
        """Merge one cycle's proposals (lowest priority number wins, then stage, then rule id), clamp.

        The dispatcher passes only proposals it may send (approved, or auto and not advisory). A
        refused winner is not replaced by a loser: the refusals (critical, lockout, override,
        no interlocks, switching too soon) would refuse the others too.
        """
        by_point: dict[str, list[Proposal]] = {}
        for proposal in proposals:
            by_point.setdefault(proposal.point, []).append(proposal)
        out: list[Dispatch] = []
        for point in sorted(by_point):
            ranked = sorted(by_point[point], key=lambda p: (p.priority, p.stage, p.rule_id))
            winner = ranked[0]
            out.append(
                Dispatch(
                    point=PointId(point),
                    proposal=winner,
                    clamped=self.clamp(winner, snapshot, history),
                    superseded=tuple(ranked[1:]),
                )
            )
        return out

    # ----------------------------------------------------------------------------------------------

    def _clamp(
        self, proposal: Proposal, snapshot: ControlSnapshot, history: CommandHistory, reasons: list[str]
    ) -> float:
        point, now = proposal.point, snapshot.now
        if not math.isfinite(proposal.value):
            raise _Refused(f"value {proposal.value} is not a finite number")
        self._check_access(proposal, snapshot)
        spec = self._config.interlocks.get(point)
        if spec is None:
            raise _Refused(f"no interlocks configured for {point}: nothing is written to it")
        state = snapshot.points.get(point)
        if state is None or not state.writable:
            raise _Refused(f"{point} is not a writable point of the snapshot")
        record = history.get(point)
        unusable = snapshot.unusable(point, self._config.max_age_s)
        if record is not None:
            reference = record.value
        elif unusable is None:
            assert state.value is not None
            reference = state.value
        else:
            raise _Refused(f"no reference value ({unusable}) and nothing commanded yet")
        value = proposal.value
        if spec.max_ramp_per_min is not None:
            minutes = (now - record.ts).total_seconds() / 60.0 if record is not None else 1.0
            step = spec.max_ramp_per_min * max(minutes, 0.0)
            ramped = min(max(value, reference - step), reference + step)
            if ramped != value:
                reasons.append(
                    f"ramp {spec.max_ramp_per_min:g}/min from {reference:g}: {value:g} -> {ramped:g}"
                )
                value = ramped
        value = self._comfort(spec, snapshot, reference, value, reasons)
        value = self._soc(spec, snapshot, value, reasons)
        value = _limits(spec, value, reasons)
        if spec.on_off is not None:
            value = self._on_off(spec, proposal, snapshot, record, value)
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                raise _Refused(f"{point}: on/off value {value:g} outside the limits")
        return value

    def _check_access(self, proposal: Proposal, snapshot: ControlSnapshot) -> None:
        point = proposal.point
        if self._config.is_critical(point):
            raise _Refused(f"{point} is a critical load: never written by the controller")
        device, _key = split_point_id(point)
        hold = snapshot.operator_holds.get(device)
        if hold is None or not hold.active(snapshot.now):
            return
        until = hold.until.isoformat() if hold.until is not None else "cleared"
        if hold.kind is OperatorHoldKind.LOCKOUT:
            raise _Refused(f"{device} locked out by {hold.by} until {until}")
        if proposal.priority > Priority.OPERATOR:
            raise _Refused(f"{device} under manual override by {hold.by} until {until}")

    def _comfort(
        self,
        spec: PointInterlock,
        snapshot: ControlSnapshot,
        reference: float,
        value: float,
        reasons: list[str],
    ) -> float:
        for band in spec.comfort:
            if value == reference:
                break
            unusable = snapshot.unusable(band.point, self._config.max_age_s)
            if unusable is not None:
                reasons.append(f"comfort {band.point} unknown ({unusable}): held at {reference:g}")
                return reference
            measured = snapshot.points[band.point].value
            assert measured is not None
            raises = (value > reference) == band.rises_with_setpoint
            if measured > band.max and raises:
                reasons.append(f"comfort {band.point} {measured:g} above {band.max:g}: held at {reference:g}")
                return reference
            if measured < band.min and not raises:
                reasons.append(f"comfort {band.point} {measured:g} below {band.min:g}: held at {reference:g}")
                return reference
        return value

    def _soc(
        self, spec: PointInterlock, snapshot: ControlSnapshot, value: float, reasons: list[str]
    ) -> float:
        soc = spec.soc
        if soc is None or value == 0:
            return value
        unusable = snapshot.unusable(soc.point, self._config.max_age_s)
        if unusable is not None:
            reasons.append(f"state of charge unknown ({unusable}): 0 kW")
            return 0.0
        soc_pct = snapshot.points[soc.point].value
        assert soc_pct is not None
        if value > 0 and soc_pct <= soc.min_pct:
            reasons.append(f"SOC {soc_pct:g} % <= {soc.min_pct:g} %: no discharge")
            return 0.0
        if value < 0 and soc_pct >= soc.max_pct:
            reasons.append(f"SOC {soc_pct:g} % >= {soc.max_pct:g} %: no charge")
            return 0.0
        return value

    def _on_off(
        self,
        spec: PointInterlock,
        proposal: Proposal,
        snapshot: ControlSnapshot,
        record: CommandRecord | None,
        value: float,
    ) -> float:
        assert spec.on_off is not None
        point, now = proposal.point, snapshot.now
        want_on = value >= ON_THRESHOLD
        state = snapshot.points[point]
        if snapshot.unusable(point, self._config.max_age_s) is None:
            assert state.value is not None
            is_on = state.value >= ON_THRESHOLD
        elif record is not None:
            is_on = record.value >= ON_THRESHOLD
        else:
            raise _Refused(f"{point}: on/off state unknown")
        if want_on != is_on:
            known = [state.changed_at] if state.changed_at is not None else []
            if record is not None and (record.value >= ON_THRESHOLD) == is_on:
                known.append(record.changed_at)
            if not known:
                raise _Refused(f"{point}: time in the current state unknown, switching refused")
            in_state_s = (now - max(known)).total_seconds()
            need_s = spec.on_off.min_on_s if is_on else spec.on_off.min_off_s
            if in_state_s < need_s:
                state_name = "on" if is_on else "off"
                raise _Refused(
                    f"{point}: {state_name} for {in_state_s:.0f} s, minimum {state_name} time {need_s:g} s"
                )
        return 1.0 if want_on else 0.0


def _limits(spec: PointInterlock, value: float, reasons: list[str]) -> float:
    if spec.max is not None and value > spec.max:
        reasons.append(f"limited to max {spec.max:g} (asked {value:g})")
        value = spec.max
    if spec.min is not None and value < spec.min:
        reasons.append(f"limited to min {spec.min:g} (asked {value:g})")
        value = spec.min
    return value
