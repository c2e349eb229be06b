"""A simulated external EMS speaking OpenADR 2.0b as a VEN: registers, polls, opts in, curtails, reports.

It stands in for a site energy management system behind the server's VTN (protocols/openadr), and
talks to it only over the wire (openleadr's ``OpenADRClient``: XML over simpleHttp, pull model):

- it registers with ``ven_name`` and offers a TELEMETRY_USAGE report with two real-power data
  points, ``load`` (the site's load) and ``reduction`` (what it is shedding), in kW (W, scale k);
- it polls the VTN at the frequency the VTN asks for;
- it answers every event with ``policy`` (``optIn`` or ``optOut``); once opted in, a LOAD_DISPATCH
  delta of -X kW sheds X kW (a SIMPLE level L sheds L x ``kw_per_level``) for the event's active
  period, until the event completes or is cancelled;
- its load is ``base_load_kw`` with a small deterministic ripple, less what it sheds.

Fault hooks for tests: :attr:`SimulatedVen.policy` (opt in or out), :attr:`SimulatedVen.report_nan`
(reports NaN, which the VTN must not take as a value), :meth:`SimulatedVen.stop` (the EMS goes
away: no polls, no answers).

Run one by hand: ``python -m simulators.openadr_ven --vtn-url http://127.0.0.1:8650/OpenADR2/Simple/2.0b
--ven-name site-ems``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from openleadr import OpenADRClient  # type: ignore[import-untyped]

__all__ = ["SimulatedVen", "VenEvent"]

_LOGGER = logging.getLogger(__name__)

LOAD_RESOURCE: Final = "load"
REDUCTION_RESOURCE: Final = "reduction"
Policy = Literal["optIn", "optOut"]


@dataclass(slots=True)
class VenEvent:
    """An event as the simulated EMS holds it."""

    event_id: str
    signal_name: str
    payload: float
    start: datetime
    end: datetime
    opt: str
    cancelled: bool = False

    def active(self, now: datetime) -> bool:
        """Return True while the EMS should act on the event."""
        return self.opt == "optIn" and not self.cancelled and self.start <= now < self.end


class SimulatedVen:
    """One simulated EMS (VEN) for one VTN."""

    def __init__(
        self,
        *,
        ven_name: str,
        vtn_url: str,
        base_load_kw: float = 800.0,
        kw_per_level: float = 100.0,
        report_interval_s: float = 1.0,
        policy: Policy = "optIn",
        reduction_as_energy: bool = False,
    ) -> None:
        self.ven_name = ven_name
        self.vtn_url = vtn_url
        self.base_load_kw = base_load_kw
        self.kw_per_level = kw_per_level
        self.report_interval_s = report_interval_s
        self.policy: Policy = policy
        """How the EMS answers new events."""
        self.reduction_as_energy = reduction_as_energy
        """Offer the reduction as real energy (Wh, scale k): a misconfigured EMS for a kW point."""
        self.report_nan = False
        """Report NaN instead of the load (a broken meter behind the EMS)."""
        self.events: dict[str, VenEvent] = {}
        self.answers: list[tuple[str, str]] = []
        """(event id, optType) in the order the EMS answered."""
        self._client: Any = None
        self._started = time.monotonic()

    @property
    def ven_id(self) -> str | None:
        """Return the venID the VTN assigned, None before registration."""
        return self._client.ven_id if self._client is not None else None

    @property
    def running(self) -> bool:
        """Return True between :meth:`start` and :meth:`stop`."""
        return self._client is not None

    def shed_kw(self, now: datetime | None = None) -> float:
        """Return the load the EMS sheds now, by its accepted events."""
        now = now or datetime.now(UTC)
        shed = 0.0
        for event in self.events.values():
            if not event.active(now):
                continue
            if event.signal_name == "LOAD_DISPATCH":
                shed += max(0.0, -event.payload)
            else:
                shed += event.payload * self.kw_per_level
        return shed

    def load_kw(self) -> float:
        """Return the site load: base with a slow ripple, less what is shed."""
        ripple = 5.0 * math.sin((time.monotonic() - self._started) / 30.0)
        return max(0.0, self.base_load_kw + ripple - self.shed_kw())

    async def start(self) -> None:
        """Register with the VTN and start polling and reporting."""
        if self._client is not None:
            return
        client = OpenADRClient(
            ven_name=self.ven_name,
            vtn_url=self.vtn_url,
            allow_jitter=False,
            show_fingerprint=False,
        )
        client.add_handler("on_event", self._on_event)
        client.add_handler("on_update_event", self._on_update_event)
        sampling = timedelta(seconds=self.report_interval_s)
        reduction = ("energy_real", "Wh") if self.reduction_as_energy else ("real_power", "W")
        reports = (
            (LOAD_RESOURCE, self._report_load, ("real_power", "W")),
            (REDUCTION_RESOURCE, self.shed_kw, reduction),
        )
        for resource, callback, (measurement, unit) in reports:
            client.add_report(
                callback=callback,
                resource_id=resource,
                measurement=measurement,
                unit=unit,
                scale="k",
                sampling_rate=sampling,
                report_specifier_id=f"{self.ven_name}-telemetry",
                r_id=f"{self.ven_name}-{resource}",
            )
        self._client = client
        try:
            await client.run()
        except BaseException:
            await self.stop()
            raise
        if client.registration_id is None:
            await self.stop()
            raise ConnectionError(f"{self.ven_name}: the VTN at {self.vtn_url} did not register us")

    async def stop(self) -> None:
        """Stop polling and reporting (the EMS goes away); the events it holds are kept."""
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):  # a half-started client lacks some of what stop() closes
            await client.stop()
        task = getattr(client, "report_queue_task", None)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _report_load(self) -> float:
        return math.nan if self.report_nan else round(self.load_kw(), 3)

    async def _on_event(self, event: Mapping[str, Any]) -> str:
        held = _held(event, self.policy)
        self.events[held.event_id] = held
        self.answers.append((held.event_id, held.opt))
        _LOGGER.info(
            "%s: event %s %s %g: %s", self.ven_name, held.event_id, held.signal_name, held.payload, held.opt
        )
        return held.opt

    async def _on_update_event(self, event: Mapping[str, Any]) -> str:
        event_id = event["event_descriptor"]["event_id"]
        previous = self.events.get(event_id)
        opt = previous.opt if previous is not None else self.policy
        held = _held(event, opt)
        self.events[event_id] = held
        self.answers.append((event_id, opt))
        return opt


def _held(event: Mapping[str, Any], opt: str) -> VenEvent:
    descriptor = event["event_descriptor"]
    signal = event["event_signals"][0]
    interval = signal["intervals"][0]
    start = interval["dtstart"]
    return VenEvent(
        event_id=descriptor["event_id"],
        signal_name=signal["signal_name"],
        payload=float(interval["signal_payload"]),
        start=start,
        end=start + interval["duration"],
        opt=opt,
        cancelled=descriptor["event_status"] == "cancelled",
    )


async def _main(args: argparse.Namespace) -> None:
    ven = SimulatedVen(
        ven_name=args.ven_name, vtn_url=args.vtn_url, base_load_kw=args.base_load_kw, policy=args.policy
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await ven.start()
    _LOGGER.info("%s: registered as %s with %s", ven.ven_name, ven.ven_id, ven.vtn_url)
    try:
        await stop.wait()
    finally:
        await ven.stop()


def main() -> None:
    """Run one simulated EMS until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vtn-url", required=True, help="e.g. http://127.0.0.1:8650/OpenADR2/Simple/2.0b")
    parser.add_argument("--ven-name", required=True)
    parser.add_argument("--base-load-kw", type=float, default=800.0)
    parser.add_argument("--policy", choices=["optIn", "optOut"], default="optIn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
