r"""The dispatcher: the only writer to devices on the controller's behalf, with a durable record.

Every write the controller wants becomes a :class:`Dispatch` row (``dispatches`` table) before
anything is sent, so the state survives a restart:

```
advisory                                  (mode advisory: shown, never sent)
awaiting_approval --approve--> approved --> sending --> verified --(hold_until)--> reverting --> reverted
                  \\--reject--> rejected               \\-> failed               \\-> revert_failed
sending (mode auto) ...
```

- **Modes** per node: ``auto`` sends at once, ``approve`` waits for an operator, ``advisory`` only
  records. A request that needs approval (production curtailment) waits whatever the mode.
- **Sending** goes through the command channel (the gateway that owns the device writes, waits for the
  acknowledgement and reads back). A result that is not ``verified`` is retried up to ``retries``
  times with a pause, then the dispatch is ``failed`` with the gateway's reason.
- **Revert**: a dispatch with ``hold_until`` gets the point's value from before the write back when the
  hold ends (the value is read just before sending).
- **Restart**: a dispatch left ``sending`` by a crash is resolved on start: the command channel is at
  most once (a claimed command is never executed twice), so it is marked ``failed`` ("interrupted")
  rather than sent again; holds keep their ``hold_until`` and are reverted on time.
- **Heartbeat**: :meth:`Dispatcher.heartbeat` writes an increasing counter to configured points, so a
  device can fall back to local control when it stops changing.

Everything is audited through the ``audit`` callback: who, what and why.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from scada.model import UTC, Clock, Command, CommandResult, CommandStatus, NodeId, PointId, Priority
from scada.runtime import raise_if_cancelling

__all__ = [
    "CommandSender",
    "Dispatch",
    "DispatchError",
    "DispatchMode",
    "DispatchRequest",
    "DispatchState",
    "DispatchStore",
    "Dispatcher",
    "OutcomeHook",
]

_LOGGER = logging.getLogger(__name__)

CommandSender = Callable[[Command, float], Awaitable[CommandResult | None]]
"""``send(command, wait_s)``: put a command on the channel and return the gateway's result, or None."""
Auditor = Callable[[str, str, str, Mapping[str, Any]], Awaitable[None]]
"""``audit(actor, action, target, detail)``."""
OutcomeHook = Callable[["Dispatch"], Awaitable[None]]
"""Told every dispatch that ended sending or reverting (verified, failed, reverted, revert failed)."""
LatestValue = Callable[[PointId], Awaitable[float | None]]
"""The point's current value (to revert to), or None if unknown."""

SEND_WAIT_S: Final = 10.0
APPROVAL_WAIT_S: Final = 15.0
"""How long an approval over the API waits for the control leader's outcome before answering."""
APPROVAL_POLL_S: Final = 0.1


class DispatchMode(enum.StrEnum):
    """How a node's dispatches are carried out."""

    AUTO = "auto"
    APPROVE = "approve"
    ADVISORY = "advisory"


class DispatchState(enum.StrEnum):
    """Where a dispatch stands."""

    ADVISORY = "advisory"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    SENDING = "sending"
    VERIFIED = "verified"
    FAILED = "failed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    REVERT_FAILED = "revert_failed"


class DispatchError(Exception):
    """An operator action that the dispatch's state does not allow (the API answers 409)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchRequest:
    """A write the controller (or an operator) wants, already merged and clamped to interlocks."""

    node: NodeId
    point: PointId
    value: float
    reason: str
    rule_id: str = "manual"
    stage: int = 0
    priority: Priority = Priority.OPTIMISER
    hold_until: datetime | None = None
    needs_approval: bool = False
    expected_kw: float | None = None
    """The reduction the rule expects, for planning and the cockpit."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A stored dispatch."""

    id: int
    created_at: datetime
    node: NodeId
    point: PointId
    value: float
    reason: str
    rule_id: str
    stage: int
    priority: int
    mode: DispatchMode
    state: DispatchState
    hold_until: datetime | None
    previous_value: float | None
    correlation_id: str | None
    result: Mapping[str, Any] | None
    decided_by: str | None
    decision_comment: str
    expected_kw: float | None

    def to_json(self) -> dict[str, Any]:
        """Return the dispatch as the API shows it."""
        return {
            "id": self.id,
            "created_at": self.created_at.astimezone(UTC).isoformat(),
            "node": self.node,
            "point": self.point,
            "value": self.value,
            "reason": self.reason,
            "rule_id": self.rule_id,
            "stage": self.stage,
            "priority": self.priority,
            "mode": self.mode.value,
            "state": self.state.value,
            "hold_until": self.hold_until.astimezone(UTC).isoformat() if self.hold_until else None,
            "previous_value": self.previous_value,
            "correlation_id": self.correlation_id,
            "result": dict(self.result) if self.result is not None else None,
            "decided_by": self.decided_by,
            "decision_comment": self.decision_comment,
            "expected_kw": self.expected_kw,
        }


def _dispatch(row: Any) -> Dispatch:
    return Dispatch(
        id=row["id"],
        created_at=row["created_at"],
        node=NodeId(row["node_id"]),
        point=PointId(row["point_id"]),
        value=row["value"],
        reason=row["reason"],
        rule_id=row["rule_id"],
        stage=row["stage"],
        priority=row["priority"],
        mode=DispatchMode(row["mode"]),
        state=DispatchState(row["state"]),
        hold_until=row["hold_until"],
        previous_value=row["previous_value"],
        correlation_id=row["correlation_id"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        decided_by=row["decided_by"],
        decision_comment=row["decision_comment"],
        expected_kw=row["expected_kw"],
    )


class DispatchStore:
    """The ``dispatches`` table (migration 008)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def create(self, request: DispatchRequest, mode: DispatchMode, state: DispatchState) -> Dispatch:
        """Record a new dispatch."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                """INSERT INTO dispatches (node_id, point_id, value, reason, rule_id, stage, priority, mode,
                                           state, hold_until, expected_kw)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *""",
                request.node,
                request.point,
                request.value,
                request.reason,
                request.rule_id,
                request.stage,
                int(request.priority),
                mode.value,
                state.value,
                request.hold_until,
                request.expected_kw,
                timeout=self._timeout_s,
            )
        return _dispatch(row)

    async def transition(
        self, dispatch_id: int, allowed_from: Sequence[DispatchState], to: DispatchState, **fields: Any
    ) -> Dispatch | None:
        """Move a dispatch to ``to`` if it is in one of ``allowed_from``; return it, or None if it was not."""
        sets = ["state = $3", "updated_at = now()"]
        values: list[Any] = [dispatch_id, [s.value for s in allowed_from], to.value]
        for name, value in fields.items():
            values.append(json.dumps(value) if name == "result" and value is not None else value)
            cast = "::jsonb" if name == "result" else ""
            sets.append(f"{name} = ${len(values)}{cast}")
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                # Column names come from this module's own keyword arguments, never from input.
                f"UPDATE dispatches SET {', '.join(sets)} "  # noqa: S608
                "WHERE id = $1 AND state = ANY($2::text[]) RETURNING *",
                *values,
                timeout=self._timeout_s,
            )
        return _dispatch(row) if row is not None else None

    async def get(self, dispatch_id: int) -> Dispatch | None:
        """Return one dispatch."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM dispatches WHERE id = $1", dispatch_id, timeout=self._timeout_s
            )
        return _dispatch(row) if row is not None else None

    async def select(
        self,
        *,
        states: Sequence[DispatchState] | None = None,
        nodes: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Dispatch]:
        """Return the newest dispatches (in some states, of some nodes)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT * FROM dispatches
                   WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
                     AND ($2::text[] IS NULL OR node_id = ANY($2::text[]))
                   ORDER BY id DESC LIMIT $3""",
                [s.value for s in states] if states is not None else None,
                list(nodes) if nodes is not None else None,
                limit,
                timeout=self._timeout_s,
            )
        return [_dispatch(r) for r in rows]

    async def due_reverts(self, now: datetime) -> list[Dispatch]:
        """Return verified dispatches whose hold has ended."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT * FROM dispatches WHERE state = 'verified' AND hold_until IS NOT NULL
                   AND hold_until <= $1 ORDER BY hold_until LIMIT 1000""",
                now,
                timeout=self._timeout_s,
            )
        return [_dispatch(r) for r in rows]


class Dispatcher:
    """Carry out dispatch requests by mode, with retries, verification, reverts and an audit trail."""

    def __init__(
        self,
        store: DispatchStore,
        send: CommandSender,
        latest: LatestValue,
        *,
        clock: Clock,
        modes: Mapping[str, DispatchMode] | None = None,
        audit: Auditor | None = None,
        retries: int = 2,
        retry_pause_s: float = 2.0,
        send_wait_s: float = SEND_WAIT_S,
        active: bool = True,
        outcome: OutcomeHook | None = None,
    ) -> None:
        """Set up; ``active`` is False where the control lease is not held.

        A passive dispatcher records operator decisions; the leader's :meth:`run` carries approved
        dispatches out.
        """
        if retries < 0 or retry_pause_s < 0 or send_wait_s <= 0:
            raise ValueError("retries and retry_pause_s must be >= 0, send_wait_s > 0")
        self._store = store
        self._send = send
        self._latest = latest
        self._clock = clock
        self._modes = dict(modes or {})
        self._audit = audit
        self._retries = retries
        self._retry_pause_s = retry_pause_s
        self._send_wait_s = send_wait_s
        self._active = active
        self._outcome_hook = outcome
        self._executing: set[int] = set()
        self._heartbeat = 0

    @property
    def store(self) -> DispatchStore:
        """Return the dispatches table."""
        return self._store

    def mode_of(self, node: str) -> DispatchMode:
        """Return a node's dispatch mode (``auto`` unless configured)."""
        return self._modes.get(node, DispatchMode.AUTO)

    async def submit(self, request: DispatchRequest, *, actor: str = "controller") -> Dispatch:
        """Record a request and, in auto mode, carry it out now; return the dispatch as it ends up."""
        mode = self.mode_of(request.node)
        if mode is DispatchMode.ADVISORY:
            state = DispatchState.ADVISORY
        elif mode is DispatchMode.APPROVE or request.needs_approval:
            state = DispatchState.AWAITING_APPROVAL
        else:
            state = DispatchState.APPROVED
        dispatch = await self._store.create(request, mode, state)
        await self._note(
            actor, "dispatch.propose", dispatch, {"state": state.value, "reason": request.reason}
        )
        if state is DispatchState.APPROVED:
            return await self._execute(dispatch) if self._active else await self._outcome(dispatch)
        return dispatch

    async def approve(self, dispatch_id: int, *, by: str, comment: str = "") -> Dispatch:
        """Approve a waiting dispatch and carry it out."""
        approved = await self._store.transition(
            dispatch_id,
            [DispatchState.AWAITING_APPROVAL],
            DispatchState.APPROVED,
            decided_by=by,
            decided_at=self._clock.now(),
            decision_comment=comment,
        )
        if approved is None:
            raise await self._refusal(dispatch_id, "approve")
        await self._note(by, "dispatch.approve", approved, {"comment": comment})
        if not self._active:
            return await self._outcome(approved)
        return await self._execute(approved)

    async def _outcome(self, approved: Dispatch) -> Dispatch:
        """Wait (at most ``APPROVAL_WAIT_S``) for the control leader to carry out an approval."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPROVAL_WAIT_S
        current = approved
        while loop.time() < deadline:
            await asyncio.sleep(APPROVAL_POLL_S)
            current = await self._store.get(approved.id) or current
            if current.state not in (DispatchState.APPROVED, DispatchState.SENDING):
                break
        return current  # still approved or sending after the wait: the caller polls GET

    async def reject(self, dispatch_id: int, *, by: str, comment: str = "") -> Dispatch:
        """Reject a waiting dispatch."""
        rejected = await self._store.transition(
            dispatch_id,
            [DispatchState.AWAITING_APPROVAL],
            DispatchState.REJECTED,
            decided_by=by,
            decided_at=self._clock.now(),
            decision_comment=comment,
        )
        if rejected is None:
            raise await self._refusal(dispatch_id, "reject")
        await self._note(by, "dispatch.reject", rejected, {"comment": comment})
        return rejected

    async def _refusal(self, dispatch_id: int, action: str) -> Exception:
        current = await self._store.get(dispatch_id)
        if current is None:
            return KeyError(dispatch_id)
        return DispatchError(f"cannot {action} dispatch {dispatch_id} in state {current.state.value}")

    async def _execute(self, dispatch: Dispatch) -> Dispatch:
        if dispatch.id in self._executing:
            # Another task of this dispatcher carries it out (submit() and run()'s pick-up of approved
            # dispatches can meet on a fresh one): the store's state change sends it only once, and
            # this caller waits for that outcome instead of answering "sending".
            return await self._outcome(dispatch)
        self._executing.add(dispatch.id)
        try:
            return await self._execute_once(dispatch)
        finally:
            self._executing.discard(dispatch.id)

    async def _execute_once(self, dispatch: Dispatch) -> Dispatch:
        previous = await self._latest(dispatch.point) if dispatch.hold_until is not None else None
        sending = await self._store.transition(
            dispatch.id, [DispatchState.APPROVED], DispatchState.SENDING, previous_value=previous
        )
        if sending is None:
            return await self._store.get(dispatch.id) or dispatch
        result, attempts = await self._send_with_retries(sending, sending.value, revert=False)
        body = _result_json(result, attempts)
        verified = result is not None and result.status is CommandStatus.VERIFIED
        done = await self._store.transition(
            sending.id,
            [DispatchState.SENDING],
            DispatchState.VERIFIED if verified else DispatchState.FAILED,
            result=body,
            correlation_id=result.correlation_id if result is not None else None,
        )
        final = done or sending
        await self._note("dispatcher", f"dispatch.{final.state.value}", final, body)
        await self._tell(final)
        return final

    async def _send_with_retries(
        self, dispatch: Dispatch, value: float, *, revert: bool
    ) -> tuple[CommandResult | None, int]:
        result: CommandResult | None = None
        attempts = 0
        for attempt in range(self._retries + 1):
            attempts = attempt + 1
            command = Command(
                point=dispatch.point,
                value=value,
                priority=_priority(dispatch.priority),
                source=f"dispatch:{dispatch.id}",
                reason=("revert: " if revert else "") + dispatch.reason,
                correlation_id=f"dispatch-{dispatch.id}-{'rs'[not revert]}{attempt}-{uuid.uuid4().hex[:8]}",
                hold_until=None if revert else dispatch.hold_until,
            )
            try:
                result = await self._send(command, self._send_wait_s)
            except (OSError, TimeoutError) as err:
                raise_if_cancelling()
                _LOGGER.warning("dispatch %d: command channel: %s", dispatch.id, err)
                result = None
            if result is not None and result.status in (CommandStatus.VERIFIED, CommandStatus.REJECTED):
                break  # done, or refused for good (not writable, out of range): retrying cannot help
            if attempt < self._retries:
                await self._clock.sleep(self._retry_pause_s)
        return result, attempts

    async def execute_approved(self) -> list[Dispatch]:
        """Carry out dispatches approved elsewhere (an API process) or left approved by a restart."""
        approved = await self._store.select(states=[DispatchState.APPROVED], limit=100)
        out: list[Dispatch] = []
        now = self._clock.now()
        for dispatch in reversed(approved):  # oldest first
            if dispatch.hold_until is not None and dispatch.hold_until <= now:
                expired = await self._store.transition(
                    dispatch.id,
                    [DispatchState.APPROVED],
                    DispatchState.FAILED,
                    result={"status": "expired", "reason": "its hold ended before it could be sent"},
                )
                if expired is not None:
                    await self._note("dispatcher", "dispatch.failed", expired, {"reason": "expired"})
                    await self._tell(expired)
                    out.append(expired)
                continue
            out.append(await self._execute(dispatch))
        return out

    async def revert_due(self) -> list[Dispatch]:
        """Write the previous value back for every hold that has ended."""
        out: list[Dispatch] = []
        for dispatch in await self._store.due_reverts(self._clock.now()):
            reverting = await self._store.transition(
                dispatch.id, [DispatchState.VERIFIED], DispatchState.REVERTING
            )
            if reverting is None:
                continue
            if reverting.previous_value is None:
                done = await self._store.transition(
                    reverting.id,
                    [DispatchState.REVERTING],
                    DispatchState.REVERT_FAILED,
                    result={**(reverting.result or {}), "revert": "no previous value was known"},
                )
            else:
                result, attempts = await self._send_with_retries(
                    reverting, reverting.previous_value, revert=True
                )
                ok = result is not None and result.status is CommandStatus.VERIFIED
                done = await self._store.transition(
                    reverting.id,
                    [DispatchState.REVERTING],
                    DispatchState.REVERTED if ok else DispatchState.REVERT_FAILED,
                    result={**(reverting.result or {}), "revert": _result_json(result, attempts)},
                )
            final = done or reverting
            await self._note("dispatcher", f"dispatch.{final.state.value}", final, {})
            await self._tell(final)
            out.append(final)
        return out

    async def resume(self) -> int:
        """Resolve dispatches a crash left ``sending`` or ``reverting`` (start-up); return how many."""
        stuck = await self._store.select(
            states=[DispatchState.SENDING, DispatchState.REVERTING], limit=10_000
        )
        for dispatch in stuck:
            to = (
                DispatchState.FAILED
                if dispatch.state is DispatchState.SENDING
                else DispatchState.REVERT_FAILED
            )
            done = await self._store.transition(
                dispatch.id,
                [dispatch.state],
                to,
                result={
                    **(dispatch.result or {}),
                    "interrupted": "the server stopped while this was in flight",
                },
            )
            if done is not None:
                await self._note("dispatcher", f"dispatch.{to.value}", done, {"interrupted": True})
        return len(stuck)

    async def heartbeat(self, points: Sequence[PointId]) -> None:
        """Write an increasing counter (mod 65536) to each heartbeat point; devices watch it change."""
        self._heartbeat = (self._heartbeat + 1) % 65_536
        for point in points:
            command = Command(
                point=point,
                value=float(self._heartbeat),
                priority=Priority.SAFETY,
                source="dispatcher:heartbeat",
                reason="controller heartbeat",
                correlation_id=f"heartbeat-{uuid.uuid4().hex[:12]}",
            )
            try:
                await self._send(command, self._send_wait_s)
            except (OSError, TimeoutError) as err:
                raise_if_cancelling()
                _LOGGER.warning("heartbeat to %s failed: %s", point, err)

    async def run(
        self, *, heartbeat_points: Sequence[PointId] = (), period_s: float = 1.0, heartbeat_s: float = 10.0
    ) -> None:
        """Send approved dispatches, revert ended holds every ``period_s`` and beat every ``heartbeat_s``."""
        await self.resume()
        since_beat = heartbeat_s
        while True:
            try:
                await self.execute_approved()
                await self.revert_due()
                if heartbeat_points and since_beat >= heartbeat_s:
                    since_beat = 0.0
                    await self.heartbeat(heartbeat_points)
            except (OSError, TimeoutError, asyncpg.PostgresError) as err:
                raise_if_cancelling()
                _LOGGER.warning("dispatcher: turn failed (will retry): %s", err)
            await self._clock.sleep(period_s)
            since_beat += period_s

    async def _tell(self, dispatch: Dispatch) -> None:
        """Pass an outcome on (events stream, alarms); a failure to tell does not undo the dispatch."""
        if self._outcome_hook is None:
            return
        try:
            await self._outcome_hook(dispatch)
        except (OSError, TimeoutError) as err:
            raise_if_cancelling()
            _LOGGER.warning("dispatch %d: outcome not published: %s", dispatch.id, err)

    async def _note(self, actor: str, action: str, dispatch: Dispatch, detail: Mapping[str, Any]) -> None:
        if self._audit is None:
            return
        await self._audit(
            actor,
            action,
            f"dispatch:{dispatch.id}",
            {
                "node": dispatch.node,
                "point": dispatch.point,
                "value": dispatch.value,
                "rule": dispatch.rule_id,
                "stage": dispatch.stage,
                **detail,
            },
        )


def _priority(value: int) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        return Priority.OPTIMISER


def _result_json(result: CommandResult | None, attempts: int) -> dict[str, Any]:
    if result is None:
        return {"status": "no result", "attempts": attempts, "reason": "no gateway answered"}
    return {
        "status": result.status.value,
        "readback": result.readback,
        "reason": result.reason,
        "elapsed_ms": result.elapsed_ms,
        "attempts": attempts,
        "ts": result.ts.astimezone(UTC).isoformat(),
    }
