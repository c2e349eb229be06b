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

What is not modelled yet: tariffs (none are configured) and an intensity forecast (the grid factor
in force is used for every coming hour).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from control_engine.control_config import ControlConfig, NodeMode
from control_engine.dispatcher import Dispatcher, DispatchMode, DispatchRequest, DispatchState
from control_engine.interlocks import CommandHistory, Interlocks
from control_engine.rules import ControllerState, ControlSnapshot, Decision, NodeBudget, PointState, decide
from scada.model import Clock, NodeId, PointId
from scada.runtime import raise_if_cancelling

__all__ = ["ControlService", "dispatch_modes"]

_LOGGER = logging.getLogger(__name__)

CONTROL_PERIOD_S: Final = 60.0
DECIDE_DEADLINE_S: Final = 5.0

BudgetSource = Callable[[], Awaitable[Mapping[str, NodeBudget]]]
PointSource = Callable[[Sequence[PointId]], Awaitable[Mapping[str, PointState]]]
IntensitySource = Callable[[], tuple[float | None, tuple[float, ...]]]
Auditor = Callable[[str, str, str, Mapping[str, Any]], Awaitable[None]]


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
    ) -> None:
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

    async def cycle(self) -> Decision | None:
        """Run one control cycle; return its decision (None if it overran its deadline)."""
        now = self._clock.now()
        intensity_now, intensity_hours = self._intensity()
        snapshot = ControlSnapshot(
            now=now,
            budgets=await self._budgets(),
            points=await self._points(self._watched),
            intensity_kg_per_kwh=intensity_now,
            intensity_hourly_kg_per_kwh=intensity_hours,
        )
        try:
            async with asyncio.timeout(self._deadline_s):
                decision = await asyncio.to_thread(decide, snapshot, self._config, self._state)
        except TimeoutError:
            _LOGGER.warning(
                "control cycle overran %.1f s: abandoned, the next one starts afresh", self._deadline_s
            )
            await self._note("controller", "control.overrun", "controller", {"deadline_s": self._deadline_s})
            return None
        self._state = decision.state
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
        await self._dispatch(decision, snapshot)
        return decision

    async def _dispatch(self, decision: Decision, snapshot: ControlSnapshot) -> None:
        in_force = await self._in_force()
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

    async def _in_force(self) -> dict[str, tuple[float, str]]:
        """Return point -> (value, rule) of dispatches verified and held, waiting or advisory now."""
        live = await self._dispatcher.store.select(
            states=[
                DispatchState.VERIFIED,
                DispatchState.AWAITING_APPROVAL,
                DispatchState.ADVISORY,
                DispatchState.SENDING,
            ],
            limit=1000,
        )
        now = self._clock.now()
        out: dict[str, tuple[float, str]] = {}
        for dispatch in reversed(live):  # oldest first: the newest wins
            if dispatch.hold_until is not None and dispatch.hold_until <= now:
                continue
            out[dispatch.point] = (dispatch.value, dispatch.rule_id)
        return out

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
