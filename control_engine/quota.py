"""Carbon quotas: where a node stands against its month's allowance, and when to say so.

A quota is a node's allowance of tCO2e for one calendar month of the site's time zone. Against it
:class:`QuotaStatus` puts the actual emissions so far and the month-end forecast (with its
prediction interval), and prices the difference at the carbon price: a surplus has a value, a
deficit is a penalty exposure (CNY).

:class:`QuotaAlerts` turns a stream of statuses into threshold crossings, at 80 %, 90 % and 100 % by
default, separately on the actuals and on the forecast:

- **once per crossing**: a threshold fires when the share first reaches it, not on every update
  that stays above it;
- **hysteresis**: it re-arms only after the share has fallen below ``threshold - hysteresis_pct``, so
  a forecast wobbling around 90 % does not fire every minute;
- **per month**: a new month starts with every threshold armed.

The arithmetic is pure (no I/O, no clock): the ledger and forecast feed it, the notifier delivers
what it returns.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scada.model import NodeId

__all__ = [
    "DEFAULT_THRESHOLDS_PCT",
    "Basis",
    "QuotaAlerts",
    "QuotaCrossing",
    "QuotaStatus",
]

DEFAULT_THRESHOLDS_PCT: tuple[float, ...] = (80.0, 90.0, 100.0)
"""Shares of the quota that raise an alert (the requirements' 80 % and 90 %, and the quota itself)."""


class Basis(enum.StrEnum):
    """What a share of the quota is computed from."""

    ACTUAL = "actual"
    """Emissions so far this month."""
    FORECAST = "forecast"
    """Emissions so far plus the forecast of the rest of the month."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaStatus:
    """One node's month against its quota, with the forecast and the carbon price."""

    node: NodeId
    month: str
    """``YYYY-MM`` in the site's time zone."""
    quota_t: float
    """Allowance for the month, tCO2e; must be positive."""
    actual_t: float
    """Emissions so far this month, tCO2e."""
    forecast_t: float
    """Month-end forecast (actual so far plus the rest), tCO2e."""
    forecast_low_t: float | None = None
    forecast_high_t: float | None = None
    """Bounds of the forecast's prediction interval, when the forecast gives one."""
    price_cny_per_t: float = 0.0
    """Carbon price used to value the surplus or deficit."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.quota_t) and self.quota_t > 0):
            raise ValueError(
                f"{self.node} {self.month}: quota_t must be a positive number, got {self.quota_t}"
            )
        for name in ("actual_t", "forecast_t", "price_cny_per_t"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{self.node} {self.month}: {name} must be a number >= 0, got {value}")

    def share_pct(self, basis: Basis) -> float:
        """Return actual or forecast emissions as a percentage of the quota.

        >>> s = QuotaStatus(node=NodeId("w"), month="2026-03", quota_t=200, actual_t=90, forecast_t=210)
        >>> s.share_pct(Basis.FORECAST)
        105.0
        """
        emitted = self.actual_t if basis is Basis.ACTUAL else self.forecast_t
        return 100.0 * emitted / self.quota_t

    @property
    def surplus_t(self) -> float:
        """Return the allowance left after the actual emissions (negative: already over)."""
        return self.quota_t - self.actual_t

    @property
    def forecast_surplus_t(self) -> float:
        """Return the allowance expected to be left at month end (negative: a deficit)."""
        return self.quota_t - self.forecast_t

    @property
    def forecast_value_cny(self) -> float:
        """Return the forecast surplus priced at the carbon price: > 0 a value, < 0 a penalty exposure.

        >>> QuotaStatus(node=NodeId("w"), month="2026-03", quota_t=200, actual_t=90, forecast_t=210,
        ...             price_cny_per_t=95.0).forecast_value_cny
        -950.0
        """
        return self.forecast_surplus_t * self.price_cny_per_t


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaCrossing:
    """A threshold was reached: what the notifier turns into an alert."""

    node: NodeId
    month: str
    basis: Basis
    threshold_pct: float
    share_pct: float
    status: QuotaStatus

    @property
    def key(self) -> str:
        """Return an id that is the same for the same crossing, for idempotent delivery."""
        return f"quota:{self.node}:{self.month}:{self.basis.value}:{self.threshold_pct:g}"


@dataclass(slots=True)
class _Armed:
    month: str
    fired: set[float] = field(default_factory=set)


class QuotaAlerts:
    """Threshold crossings of quota shares, once per crossing, with hysteresis, per node and basis."""

    def __init__(
        self, thresholds_pct: Sequence[float] = DEFAULT_THRESHOLDS_PCT, *, hysteresis_pct: float = 2.0
    ) -> None:
        if not thresholds_pct or any(not (0 < t <= 1000) for t in thresholds_pct):
            raise ValueError("thresholds_pct must be percentages in (0, 1000]")
        if not 0 <= hysteresis_pct < min(thresholds_pct):
            raise ValueError("hysteresis_pct must be >= 0 and below the lowest threshold")
        self._thresholds = tuple(sorted(set(thresholds_pct)))
        self._hysteresis_pct = hysteresis_pct
        self._state: dict[tuple[NodeId, Basis], _Armed] = {}

    @property
    def thresholds_pct(self) -> tuple[float, ...]:
        """Return the thresholds, lowest first."""
        return self._thresholds

    def fired(self, node: NodeId, basis: Basis) -> tuple[str, frozenset[float]] | None:
        """Return the month and the thresholds fired and not re-armed for a node and basis."""
        state = self._state.get((node, basis))
        return None if state is None else (state.month, frozenset(state.fired))

    def restore(self, node: NodeId, basis: Basis, month: str, fired: Sequence[float]) -> None:
        """Restore what :meth:`fired` returned (after a restart), so no crossing fires twice."""
        self._state[node, basis] = _Armed(month, {float(t) for t in fired if t in self._thresholds})

    def observe(self, status: QuotaStatus) -> list[QuotaCrossing]:
        """Feed one status update; return the thresholds it crossed, lowest first, on each basis."""
        out: list[QuotaCrossing] = []
        for basis in Basis:
            share = status.share_pct(basis)
            state = self._state.get((status.node, basis))
            if state is None or state.month != status.month:
                state = self._state[status.node, basis] = _Armed(status.month)
            for threshold in self._thresholds:
                if threshold in state.fired:
                    if share < threshold - self._hysteresis_pct:
                        state.fired.discard(threshold)  # fell back clearly below: armed again
                    continue
                if share >= threshold:
                    state.fired.add(threshold)
                    out.append(
                        QuotaCrossing(
                            node=status.node,
                            month=status.month,
                            basis=basis,
                            threshold_pct=threshold,
                            share_pct=share,
                            status=status,
                        )
                    )
        return out
