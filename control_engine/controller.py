"""The control loop: snapshot -> rules -> merge and interlocks -> dispatcher, every control period.

Each cycle builds a frozen :class:`~control_engine.rules.ControlSnapshot` from the services it is
given (month budgets from the forecasts and quotas, the watched points' latest values with their
quality and age, the grid intensity), runs :func:`~control_engine.rules.decide` in a worker thread
(the rules are CPU work and must not hold the event loop; a cycle that overruns ``decide_deadline_s``
is abandoned and reported, the next one starts afresh), merges and clamps the proposals with
:class:`~control_engine.interlocks.Interlocks`, and hands each surviving write to the
:class:`~control_engine.dispatcher.Dispatcher`, which records it and, by the node's mode, sends it,
waits for approval or only shows it. A write that is already in force or waiting is not asked for
again. Stage changes, refusals by interlocks and rule errors go to the audit log with the reason.

Tariffs come from the config (``control.tariffs``) through :func:`~control_engine.rules.hourly_signals`;
the intensity source given (the composition root builds it with the same function from the config's
profile and the grid factor in force).

The holds the rules read (the value an offset applies to) are the dispatcher's verified dispatches
in force with the value each displaced, so an offset never compounds on the controller's own write.

**State across restarts.** With a :class:`ControllerStateStore`, the stages (and since when) and the
gap sizing are loaded before the first cycle and saved after every cycle that changed them: a
restarted controller resumes its stages and dwell timers instead of climbing again from stage 0.
Holds are not stored here: the dispatches table is their record.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

import asyncpg

from control_engine.control_config import ControlConfig, NodeMode
from control_engine.dispatcher import Dispatch, Dispatcher, DispatchMode, DispatchRequest, DispatchState
from control_engine.interlocks import CommandHistory, Interlocks
from control_engine.rules import (
    ControllerState,
    ControlSnapshot,
    Decision,
    Hold,
    NodeBudget,
    PointState,
    SizingState,
    StageState,
    decide,
    hourly_signals,
)
from scada.model import Clock, NodeId, PointId
from scada.runtime import raise_if_cancelling

__all__ = [
    "ControlService",
    "ControllerStateStore",
    "StoredStateError",
    "dispatch_modes",
    "state_from_json",
    "state_to_json",
]

_LOGGER = logging.getLogger(__name__)

CONTROL_PERIOD_S: Final = 60.0
DECIDE_DEADLINE_S: Final = 5.0

BudgetSource = Callable[[], Awaitable[Mapping[str, NodeBudget]]]
PointSource = Callable[[Sequence[PointId]], Awaitable[Mapping[str, PointState]]]
IntensitySource = Callable[[], tuple[float | None, tuple[float, ...]]]
Auditor = Callable[[str, str, str, Mapping[str, Any]], Awaitable[None]]


STATE_FORMAT: Final = 1
"""Version of the stored state's JSON; a different version is not loaded (the controller starts afresh)."""


class StoredStateError(ValueError):
    """The stored controller state cannot be read back (another format, or damaged)."""


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StoredStateError(f"{where}: expected an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise StoredStateError(f"{where}: {err}") from None
    if parsed.tzinfo is None:
        raise StoredStateError(f"{where}: time without a zone")
    return parsed


def state_to_json(state: ControllerState) -> dict[str, Any]:
    """Return what is stored of a controller state: stages and sizing (holds live in dispatches).

    >>> from datetime import UTC, datetime
    >>> st = ControllerState(stages={"ent-a": StageState(stage=2, since=datetime(2026, 7, 1, tzinfo=UTC))})
    >>> state_from_json(state_to_json(st)) == st
    True
    """
    return {
        "format": STATE_FORMAT,
        "stages": {
            node: {"stage": stage.stage, "since": _time(stage.since)}
            for node, stage in sorted(state.stages.items())
        },
        "sizing": {
            node: {
                "need_kg_per_h": sizing.need_kg_per_h,
                "committed_kg_per_h": sizing.committed_kg_per_h,
                "reflected_kg_per_h": sizing.reflected_kg_per_h,
                "fills": dict(sorted(sizing.fills.items())),
                "sized_at": _time(sizing.sized_at),
                "updated_at": _time(sizing.updated_at),
            }
            for node, sizing in sorted(state.sizing.items())
        },
    }


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StoredStateError(f"{where}: expected a number, got {value!r}")
    return float(value)


def state_from_json(document: Any) -> ControllerState:
    """Return the state :func:`state_to_json` stored; raise :class:`StoredStateError` naming the field."""
    if not isinstance(document, dict):
        raise StoredStateError("controller state: expected an object")
    if document.get("format") != STATE_FORMAT:
        raise StoredStateError(
            f"controller state: format {document.get('format')!r}, expected {STATE_FORMAT}"
        )
    stages: dict[str, StageState] = {}
    for node, entry in dict(document.get("stages") or {}).items():
        where = f"stages.{node}"
        if not isinstance(entry, dict) or not isinstance(entry.get("stage"), int):
            raise StoredStateError(f"{where}.stage: expected an integer")
        stages[node] = StageState(
            stage=entry["stage"], since=_parse_time(entry.get("since"), f"{where}.since")
        )
    sizing: dict[str, SizingState] = {}
    for node, entry in dict(document.get("sizing") or {}).items():
        where = f"sizing.{node}"
        if not isinstance(entry, dict):
            raise StoredStateError(f"{where}: expected an object")
        fills = entry.get("fills") or {}
        if not isinstance(fills, dict):
            raise StoredStateError(f"{where}.fills: expected an object")
        sizing[node] = SizingState(
            need_kg_per_h=_number(entry.get("need_kg_per_h"), f"{where}.need_kg_per_h"),
            committed_kg_per_h=_number(entry.get("committed_kg_per_h"), f"{where}.committed_kg_per_h"),
            reflected_kg_per_h=_number(entry.get("reflected_kg_per_h"), f"{where}.reflected_kg_per_h"),
            fills={rule: _number(depth, f"{where}.fills.{rule}") for rule, depth in fills.items()},
            sized_at=_parse_time(entry.get("sized_at"), f"{where}.sized_at"),
            updated_at=_parse_time(entry.get("updated_at"), f"{where}.updated_at"),
        )
    return ControllerState(stages=stages, sizing=sizing)


class ControllerStateStore:
    """The controller's stages and sizing in ``controller_state`` (migration 010), one row per scope.

    ``fencing_token`` (the control lease's, when there is one) guards against a deposed leader: a
    save with a token lower than the stored one changes nothing.
    """

    def __init__(self, pool: asyncpg.Pool, *, scope: str = "default", timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._scope = scope
        self._timeout_s = timeout_s

    async def load(self) -> ControllerState:
        """Return the stored state (an empty one when none is stored)."""
        async with asyncio.timeout(self._timeout_s):
            row = await self._pool.fetchrow(
                "SELECT state FROM controller_state WHERE scope = $1", self._scope
            )
        if row is None:
            return ControllerState()
        return state_from_json(json.loads(row["state"]))

    async def save(self, state: ControllerState, *, at: datetime, fencing_token: int | None = None) -> bool:
        """Store the state; return False when a newer leader's token is stored (nothing changed)."""
        async with asyncio.timeout(self._timeout_s):
            status = await self._pool.execute(
                """
                INSERT INTO controller_state (scope, state, saved_at, fencing_token)
                VALUES ($1, $2::jsonb, $3, $4)
                ON CONFLICT (scope) DO UPDATE
                   SET state = EXCLUDED.state, saved_at = EXCLUDED.saved_at,
                       fencing_token = EXCLUDED.fencing_token
                 WHERE controller_state.fencing_token IS NULL
                    OR EXCLUDED.fencing_token IS NULL
                    OR controller_state.fencing_token <= EXCLUDED.fencing_token
                """,
                self._scope,
                json.dumps(state_to_json(state)),
                at,
                fencing_token,
            )
        return bool(status.endswith(" 1"))


def dispatch_modes(config: ControlConfig, nodes: Sequence[str]) -> dict[str, DispatchMode]:
    """Return the dispatcher mode of every node (the config's, else its default)."""
    modes: dict[str, DispatchMode] = {}
    for node in nodes:
        control = config.nodes.get(node)
        mode = control.mode if control is not None else config.default_mode
        modes[node] = {
            NodeMode.AUTO: DispatchMode.AUTO,
            NodeMode.APPROVE: DispatchMode.APPROVE,
        }.get(mode, DispatchMode.ADVISORY)
    return modes


class ControlService:
    """Runs the carbon-budget controller (see the module docstring)."""

    def __init__(
        self,
        config: ControlConfig,
        dispatcher: Dispatcher,
        *,
        budgets: BudgetSource,
        points: PointSource,
        intensity: IntensitySource,
        watched: Sequence[PointId],
        clock: Clock,
        audit: Auditor | None = None,
        period_s: float = CONTROL_PERIOD_S,
        decide_deadline_s: float = DECIDE_DEADLINE_S,
        state_store: ControllerStateStore | None = None,
        fencing_token: Callable[[], int | None] | None = None,
    ) -> None:
        """Set up; with a ``state_store`` the stages survive a restart (see the module docstring)."""
        self._config = config
        self._interlocks = Interlocks(config)
        self._dispatcher = dispatcher
        self._budgets = budgets
        self._points = points
        self._intensity = intensity
        self._watched = list(watched)
        self._clock = clock
        self._audit = audit
        self._period_s = period_s
        self._deadline_s = decide_deadline_s
        self._state = ControllerState()
        self._history = CommandHistory()
        self._store = state_store
        self._fencing_token = fencing_token
        self._loaded = state_store is None
        self._saved: dict[str, Any] | None = None

    @property
    def state(self) -> ControllerState:
        """Return the controller's state after the last cycle (or as loaded)."""
        return self._state

    async def load_state(self) -> ControllerState:
        """Load the stored stages and sizing (once); a damaged or foreign state is logged and dropped."""
        if self._store is None or self._loaded:
            return self._state
        try:
            loaded = await self._store.load()
        except StoredStateError as err:
            _LOGGER.warning("stored controller state not used (starting from stage 0): %s", err)
            await self._note("controller", "control.state_dropped", "controller", {"error": str(err)})
            loaded = ControllerState()
        self._state = replace(loaded, holds=self._state.holds)
        self._saved = state_to_json(self._state)
        self._loaded = True
        if loaded.stages:
            _LOGGER.info(
                "controller state loaded: %s",
                ", ".join(f"{node} stage {s.stage}" for node, s in sorted(loaded.stages.items())),
            )
        return self._state

    async def cycle(self) -> Decision | None:
        """Run one control cycle; return its decision (None if it overran its deadline)."""
        await self.load_state()
        now = self._clock.now()
        intensity_now, intensity_hours = self._intensity()
        tariffs = hourly_signals(self._config, now, None, hours=max(len(intensity_hours), 24))
        live = await self._live_dispatches()
        snapshot = ControlSnapshot(
            now=now,
            budgets=await self._budgets(),
            points=await self._points(self._watched),
            intensity_kg_per_kwh=intensity_now,
            intensity_hourly_kg_per_kwh=intensity_hours,
            tariff_hourly_cny_per_kwh=tariffs.tariff_hourly_cny_per_kwh,
            node_tariff_hourly_cny_per_kwh=tariffs.node_tariff_hourly_cny_per_kwh,
        )
        state = replace(self._state, holds=_holds(live, now))
        try:
            async with asyncio.timeout(self._deadline_s):
                decision = await asyncio.to_thread(decide, snapshot, self._config, state)
        except TimeoutError:
            _LOGGER.warning(
                "control cycle overran %.1f s: abandoned, the next one starts afresh", self._deadline_s
            )
            await self._note("controller", "control.overrun", "controller", {"deadline_s": self._deadline_s})
            return None
        self._state = decision.state
        await self._save(now)
        for change in decision.transitions:
            await self._note(
                "controller",
                "control.stage",
                f"node:{change.node}",
                {
                    "from": change.from_stage,
                    "to": change.to_stage,
                    "share_pct": change.share_pct,
                    "reason": change.reason,
                },
            )
        for error in decision.rule_errors:
            _LOGGER.warning("control rule %s isolated: %s", error.rule_id, error.error)
            await self._note(
                "controller", "control.rule_error", f"rule:{error.rule_id}", {"error": error.error}
            )
        await self._dispatch(decision, snapshot, _in_force(live, now))
        return decision

    async def _save(self, now: datetime) -> None:
        """Store the state if this cycle changed it (a failure is logged; the next cycle retries)."""
        if self._store is None:
            return
        document = state_to_json(self._state)
        if document == self._saved:
            return
        token = self._fencing_token() if self._fencing_token is not None else None
        try:
            stored = await self._store.save(self._state, at=now, fencing_token=token)
        except (OSError, TimeoutError, asyncpg.PostgresError) as err:
            raise_if_cancelling()
            _LOGGER.warning("controller state not saved (will retry next cycle): %s", err)
            return
        if not stored:
            _LOGGER.warning("controller state not saved: a newer control lease holder owns it")
        self._saved = document

    async def _dispatch(
        self, decision: Decision, snapshot: ControlSnapshot, in_force: Mapping[str, tuple[float, str]]
    ) -> None:
        for merged in self._interlocks.merge_and_clamp(decision.proposals, snapshot, self._history):
            proposal, clamped = merged.proposal, merged.clamped
            if clamped.refused or clamped.value is None:
                await self._note(
                    "controller",
                    "control.refused",
                    f"point:{merged.point}",
                    {"rule": proposal.rule_id, "value": proposal.value, "reasons": list(clamped.reasons)},
                )
                continue
            asked = (clamped.value, proposal.rule_id)
            if in_force.get(merged.point) == asked:
                continue  # already sent, waiting or shown: not asked again
            dispatch = await self._dispatcher.submit(
                DispatchRequest(
                    node=NodeId(proposal.node),
                    point=merged.point,
                    value=clamped.value,
                    reason=proposal.reason
                    + (f" (clamped: {'; '.join(clamped.reasons)})" if clamped.reasons else ""),
                    rule_id=proposal.rule_id,
                    stage=proposal.stage,
                    priority=proposal.priority,
                    hold_until=proposal.hold_until,
                    needs_approval=proposal.needs_approval,
                    expected_kw=proposal.expected_reduction_kw or None,
                )
            )
            if dispatch.state is DispatchState.VERIFIED:
                self._history = self._history.record(merged.point, clamped.value, self._clock.now())

    async def _live_dispatches(self) -> list[Dispatch]:
        """Return the dispatches verified and held, waiting, advisory or being sent, newest first."""
        return await self._dispatcher.store.select(
            states=[
                DispatchState.VERIFIED,
                DispatchState.AWAITING_APPROVAL,
                DispatchState.ADVISORY,
                DispatchState.SENDING,
            ],
            limit=1000,
        )

    async def run(self) -> None:
        """Run a cycle every control period until cancelled; a failed cycle is logged and retried."""
        while True:
            try:
                await self.cycle()
            except (OSError, TimeoutError, ValueError) as err:
                raise_if_cancelling()
                _LOGGER.warning("control cycle failed (will retry): %s", err)
            await self._clock.sleep(self._period_s)

    async def _note(self, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        if self._audit is not None:
            await self._audit(actor, action, target, detail)


def _in_force(live: Sequence[Dispatch], now: datetime) -> dict[str, tuple[float, str]]:
    """Return point -> (value, rule) of live dispatches whose hold runs on; the newest wins."""
    out: dict[str, tuple[float, str]] = {}
    for dispatch in reversed(live):  # oldest first: the newest wins
        if dispatch.hold_until is not None and dispatch.hold_until <= now:
            continue
        out[dispatch.point] = (dispatch.value, dispatch.rule_id)
    return out


def _holds(live: Sequence[Dispatch], now: datetime) -> dict[str, Hold]:
    """Return the verified writes in force with the value each displaced (the base of offsets)."""
    out: dict[str, Hold] = {}
    for dispatch in reversed(live):
        if (
            dispatch.state is not DispatchState.VERIFIED
            or dispatch.hold_until is None
            or dispatch.hold_until <= now
        ):
            continue
        earlier = out.get(dispatch.point)
        # Renewed writes read our own value as the one "before": keep the first displaced value.
        revert_to = earlier.revert_to if earlier is not None else dispatch.previous_value
        out[dispatch.point] = Hold(
            point=dispatch.point,
            value=dispatch.value,
            rule_id=dispatch.rule_id,
            until=dispatch.hold_until,
            revert_to=revert_to,
        )
    return out
