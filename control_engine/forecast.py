"""Month-end emission forecasts: actual so far plus the rest of the month, with a prediction interval.

Each node learns online from its own closed hours (:meth:`MonthForecaster.learn_hour`), in the
site's time zone:

- a **weekly profile**: the mean kgCO2e of each of the 168 hours of the week, exponentially
  weighted (``weekly_alpha``), so the last few weeks count most and a changed shift pattern is
  learned within weeks;
- a **daily profile**: the same over the 24 hours of the day (``daily_alpha``), the fallback for a
  weekly slot not seen yet;
- the **error of whole days**: at each local midnight the day's actual total is compared with what
  the profiles predicted for it when it began; the exponentially weighted variance of that error
  sets the interval.

The forecast for the rest of the month sums the profile over the hours left (the current hour
counted for the part still to come), corrected by the recent mean daily error times the days left
(``bias_day``, the exponentially weighted mean of actual minus predicted days: a profile lags a
trend, a warming month or a new order). The interval is ``± (z x sigma_day x sqrt(days left) + 0.5 x
|bias_day| x days left)``: the random part of the daily error adds up like independent days (``z`` =
1.645), and the trend correction itself may be half wrong. Until three days have been judged,
``sigma_day`` is 15 % of a predicted day and there is no correction. A node with no history
yet extrapolates its month-to-date rate.

Pure and synchronous: the carbon service feeds it from the ledger and asks for forecasts every
minute; its state is rebuilt after a restart by replaying the stored hourly ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

__all__ = ["MonthForecast", "MonthForecaster", "month_bounds", "month_key"]

HOUR: Final = timedelta(hours=1)
DAYS_FOR_SIGMA: Final = 3
FALLBACK_SIGMA_SHARE: Final = 0.15


@dataclass(frozen=True, slots=True, kw_only=True)
class MonthForecast:
    """Where a node's month is heading."""

    node: str
    month: str
    """``YYYY-MM`` in the site's time zone."""
    computed_at: datetime
    actual_kg: float
    """Emissions from the start of the month to ``computed_at``."""
    forecast_kg: float
    """Month-end total: the actual plus the forecast of the rest."""
    low_kg: float
    high_kg: float
    """Bounds of the prediction interval of the month-end total."""
    method: str
    """``profile`` (learned weekly and daily profiles) or ``run_rate`` (no history yet)."""


def month_key(local: datetime) -> str:
    """Return ``YYYY-MM`` of a local time."""
    return f"{local.year:04d}-{local.month:02d}"


def month_bounds(month: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """Return the start and end (exclusive) of a ``YYYY-MM`` month in ``zone``, as aware datetimes."""
    year, number = (int(part) for part in month.split("-"))
    start = datetime(year, number, 1, tzinfo=zone)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=zone)
    return start, end


@dataclass(slots=True)
class _Profile:
    weekly: list[float] = field(default_factory=lambda: [0.0] * 168)
    weekly_n: list[int] = field(default_factory=lambda: [0] * 168)
    daily: list[float] = field(default_factory=lambda: [0.0] * 24)
    daily_n: list[int] = field(default_factory=lambda: [0] * 24)
    day: date | None = None
    day_actual: float = 0.0
    day_predicted: float = 0.0
    error_mean: float = 0.0
    error_var: float = 0.0
    errors: int = 0
    last_hour: datetime | None = None


class MonthForecaster:
    """Month-end forecasts per node from profiles learned online (see the module docstring)."""

    def __init__(
        self,
        timezone: str = "Asia/Shanghai",
        *,
        weekly_alpha: float = 0.3,
        daily_alpha: float = 0.1,
        error_alpha: float = 0.15,
        z: float = 1.645,
    ) -> None:
        for name, alpha in (
            ("weekly_alpha", weekly_alpha),
            ("daily_alpha", daily_alpha),
            ("error_alpha", error_alpha),
        ):
            if not 0 < alpha <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {alpha}")
        if z <= 0:
            raise ValueError(f"z must be positive, got {z}")
        self._zone = ZoneInfo(timezone)
        self._weekly_alpha, self._daily_alpha, self._error_alpha, self._z = (
            weekly_alpha,
            daily_alpha,
            error_alpha,
            z,
        )
        self._nodes: dict[str, _Profile] = {}

    def learn_hour(self, node: str, hour: datetime, kg: float) -> None:
        """Learn one closed hour of a node (hours arrive in order; an hour seen already is ignored)."""
        if not math.isfinite(kg):
            raise ValueError(f"{node} {hour.isoformat()}: kg must be finite")
        profile = self._nodes.setdefault(node, _Profile())
        if profile.last_hour is not None and hour <= profile.last_hour:
            return
        profile.last_hour = hour
        local = hour.astimezone(self._zone)
        if profile.day != local.date():
            self._close_day(profile)
            profile.day = local.date()
            day_start = datetime(local.year, local.month, local.day, tzinfo=self._zone)
            profile.day_predicted = self._sum(profile, day_start, day_start + timedelta(days=1))
            profile.day_actual = 0.0
        profile.day_actual += kg
        weekly, daily = local.weekday() * 24 + local.hour, local.hour
        profile.weekly[weekly] = _ewma(
            profile.weekly[weekly], kg, profile.weekly_n[weekly], self._weekly_alpha
        )
        profile.weekly_n[weekly] += 1
        profile.daily[daily] = _ewma(profile.daily[daily], kg, profile.daily_n[daily], self._daily_alpha)
        profile.daily_n[daily] += 1

    def _close_day(self, profile: _Profile) -> None:
        if profile.day is None or profile.day_predicted <= 0:
            return
        error = profile.day_actual - profile.day_predicted
        if profile.errors == 0:
            profile.error_mean, profile.error_var = error, 0.0
        else:
            deviation = error - profile.error_mean
            profile.error_mean += self._error_alpha * deviation
            profile.error_var = (1 - self._error_alpha) * (
                profile.error_var + self._error_alpha * deviation**2
            )
        profile.errors += 1

    def forecast(self, node: str, now: datetime, actual_kg: float) -> MonthForecast:
        """Return the month-end forecast of ``node`` at ``now`` given its emissions so far this month."""
        local = now.astimezone(self._zone)
        month = month_key(local)
        start, end = month_bounds(month, self._zone)
        profile = self._nodes.get(node)
        # Durations from timestamps: wall-clock subtraction in one zone ignores a DST change.
        now_s, start_s, end_s = now.timestamp(), start.timestamp(), end.timestamp()
        if profile is None or not any(profile.daily_n):
            elapsed_s = now_s - start_s
            total_s = end_s - start_s
            rate_total = actual_kg * total_s / elapsed_s if elapsed_s >= 3600 else actual_kg
            spread = (rate_total - actual_kg) * 0.5
            return MonthForecast(
                node=node, month=month, computed_at=now, actual_kg=actual_kg, forecast_kg=rate_total,
                low_kg=max(actual_kg, rate_total - spread), high_kg=rate_total + spread, method="run_rate",
            )  # fmt: skip
        hour_start = local.replace(minute=0, second=0, microsecond=0)
        next_hour = hour_start + HOUR
        done_share = (local - hour_start).total_seconds() / 3600.0
        rest = (1.0 - done_share) * self._predict(profile, hour_start) + self._sum(profile, next_hour, end)
        days_left = (end_s - now_s) / 86400.0
        if profile.errors >= DAYS_FOR_SIGMA:
            # Random day-to-day error adds up as sqrt(days); a persistent bias adds up linearly.
            sigma_day, bias_day = math.sqrt(profile.error_var), profile.error_mean
        else:
            sigma_day = FALLBACK_SIGMA_SHARE * self._sum(profile, next_hour, next_hour + timedelta(days=1))
            bias_day = 0.0
        # The profile lags a trend (a warming month, a new order): the recent mean daily error corrects
        # the level of what is left, and half of it again bounds how wrong that correction may be.
        rest = max(0.0, rest + bias_day * days_left)
        half = self._z * sigma_day * math.sqrt(days_left) + 0.5 * abs(bias_day) * days_left
        total = actual_kg + rest
        return MonthForecast(
            node=node, month=month, computed_at=now, actual_kg=actual_kg, forecast_kg=total,
            low_kg=max(actual_kg, total - half), high_kg=total + half, method="profile",
        )  # fmt: skip

    def _sum(self, profile: _Profile, start: datetime, end: datetime) -> float:
        """Predicted kgCO2e over ``[start, end)`` (local hour boundaries, DST-safe by UTC steps)."""
        total = 0.0
        at = start.astimezone(UTC)
        stop = end.astimezone(UTC)
        while at < stop:
            total += self._predict(profile, at.astimezone(self._zone))
            at += HOUR
        return total

    @staticmethod
    def _predict(profile: _Profile, local: datetime) -> float:
        weekly, daily = local.weekday() * 24 + local.hour, local.hour
        n_week, n_day = profile.weekly_n[weekly], profile.daily_n[daily]
        if n_week >= 2:
            return profile.weekly[weekly]
        if n_week and n_day:
            # A slot seen in a single week leans on the daily profile too.
            return 0.5 * profile.weekly[weekly] + 0.5 * profile.daily[daily]
        if n_day:
            return profile.daily[daily]
        seen = [m for m, n in zip(profile.daily, profile.daily_n, strict=True) if n]
        return sum(seen) / len(seen) if seen else 0.0

    def nodes(self) -> list[str]:
        """Return the nodes learned so far."""
        return list(self._nodes)


def _ewma(mean: float, value: float, seen: int, alpha: float) -> float:
    if seen == 0:
        return value
    # The first observations weigh as a plain mean (1/n) until alpha takes over.
    weight = max(alpha, 1.0 / (seen + 1))
    return mean + weight * (value - mean)
