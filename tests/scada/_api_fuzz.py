"""Property-based fuzzing of a live server against its OpenAPI document (schemathesis 4).

``run_schemathesis`` generates requests for every operation of ``spec`` (valid ones, and with
``negative=True`` also invalid ones), sends them to ``base_url`` and checks each response: no 5xx,
a documented status code and content type, a body that conforms to the documented schema, and
documented response headers. It does not raise on a failing case: it counts every case and collects
each distinct failure once with a curl reproduction, so one run reports everything it found.

Synchronous on purpose: the server runs in another thread or process (the fixture of
test_api_fuzz_smoke.py, or bench/api_fuzz.py), and hypothesis drives plain functions.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import requests  # noqa: TID251 -- schemathesis's transport; this runner is sync, never on an event loop
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import FailedHealthCheck, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

__all__ = ["FuzzFailure", "FuzzReport", "run_schemathesis", "with_known_values"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SERVER_ERROR_CHECK = "not_a_server_error"
REPRODUCTION_MAX_CHARS = 1_000


@dataclass(frozen=True, slots=True)
class FuzzFailure:
    """One distinct failure: which operation, which check, and how to reproduce it."""

    operation: str
    """``METHOD /path/{template}``."""
    check: str
    """The failure kind, e.g. ``Server error``, ``Response violates schema``."""
    status: int | None
    """The response's status code (None when the request itself failed)."""
    message: str
    reproduction: str
    """A curl command (credentials filtered) for the first case that failed this way."""
    occurrences: int = 1

    @property
    def server_error(self) -> bool:
        """Return True for a 5xx answer (or no answer at all)."""
        return self.check == "Server error" or self.status is None or self.status >= 500


@dataclass(slots=True)
class FuzzReport:
    """What a run did: cases per operation, distinct failures, operations it could not generate for."""

    cases: int = 0
    cases_by_operation: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[FuzzFailure] = field(default_factory=list)
    failing_cases: int = 0
    """Cases with at least one failed check (a case can fail several checks)."""
    errors: list[str] = field(default_factory=list)
    """Operations that could not be loaded or generated for, with the reason."""
    skipped: list[str] = field(default_factory=list)
    """Operations with nothing to make invalid (negative mode only)."""

    @property
    def operations(self) -> int:
        """Return how many operations received at least one case."""
        return len(self.cases_by_operation)

    @property
    def server_errors(self) -> int:
        """Return how many distinct failures were 5xx answers or transport errors."""
        return sum(1 for f in self.failures if f.server_error)

    @property
    def schema_failures(self) -> int:
        """Return how many distinct failures were documentation mismatches (status, type, body, headers)."""
        return sum(1 for f in self.failures if not f.server_error)

    @property
    def ok(self) -> bool:
        """Return True when no case failed and every operation was exercised."""
        return not self.failures and not self.errors

    def summary(self) -> str:
        """Return a readable multi-line account of the failures (empty when there are none)."""
        lines = [f"{self.cases} cases, {self.operations} operations, {len(self.failures)} distinct failures"]
        for f in self.failures:
            lines.append(f"- {f.operation}: {f.check} (status {f.status}, x{f.occurrences}): {f.message}")
            lines.append(f"  {f.reproduction}")
        lines.extend(f"- error: {e}" for e in self.errors)
        return "\n".join(lines)


class _Collector:
    """Record failures, one entry per (operation, check, status) with the first reproduction."""

    def __init__(self, report: FuzzReport) -> None:
        self._report = report
        self._index: dict[tuple[str, str, int | None], int] = {}

    def add(self, operation: str, check: str, status: int | None, message: str, reproduction: str) -> None:
        key = (operation, check, status)
        failures = self._report.failures
        if key in self._index:
            at = self._index[key]
            old = failures[at]
            failures[at] = FuzzFailure(
                old.operation, old.check, old.status, old.message, old.reproduction, old.occurrences + 1
            )
            return
        self._index[key] = len(failures)
        first_line = message.strip().splitlines()[0] if message.strip() else check
        failures.append(
            FuzzFailure(operation, check, status, first_line[:300], reproduction[:REPRODUCTION_MAX_CHARS])
        )


def run_schemathesis(
    base_url: str,
    headers: dict[str, str],
    *,
    max_examples: int,
    spec: dict[str, Any],
    negative: bool = True,
    seed: int = 20_260_501,
    timeout_s: float = 10.0,
) -> FuzzReport:
    """Fuzz every operation of ``spec`` on the server at ``base_url``; return counts and failures.

    ``headers`` go with every request (credentials). ``max_examples`` bounds the generated cases per
    operation and generation mode; ``negative`` adds invalid inputs, which must be refused with a
    documented 4xx, never a 5xx. ``seed`` makes a run repeatable.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples: must be >= 1, not {max_examples}")
    report = FuzzReport()
    collector = _Collector(report)
    schema = schemathesis.openapi.from_dict(spec)
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if negative else [GenerationMode.POSITIVE]
    base = base_url.rstrip("/")
    settings = hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # failures are collected, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):  # an operation the loader refused is a finding, not a crash
                report.errors.append(f"load: {result.err()}")
                continue
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            run_case = _case_runner(
                label=label,
                base_url=base,
                headers=headers,
                session=session,
                timeout_s=timeout_s,
                report=report,
                collector=collector,
            )
            for mode in modes:
                test = hypothesis.seed(seed)(
                    settings(hypothesis.given(operation.as_strategy(generation_mode=mode))(run_case))
                )
                try:
                    test()
                except Unsatisfiable:
                    if mode is GenerationMode.POSITIVE:
                        report.errors.append(f"{label}: no valid case could be generated")
                    else:  # nothing to make invalid (no parameters, no body): not a finding
                        report.skipped.append(f"{label} (negative)")
                except FailedHealthCheck as err:
                    report.errors.append(f"{label} ({mode.value}): no cases generated: {err}")
    return report


def _case_runner(**context: Any) -> Callable[[schemathesis.Case[Any]], None]:
    """Return a one-argument test body for hypothesis (which takes no partials or defaults)."""

    def run_case(case: schemathesis.Case[Any]) -> None:
        _run_case(case, **context)

    return run_case


def _run_case(
    case: schemathesis.Case[Any],
    *,
    label: str,
    base_url: str,
    headers: dict[str, str],
    session: requests.Session,
    timeout_s: float,
    report: FuzzReport,
    collector: _Collector,
) -> None:
    report.cases += 1
    report.cases_by_operation[label] += 1
    reproduction = case.as_curl_command(headers=headers, base_url=base_url)
    try:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout_s)
    except requests.RequestException as err:
        report.failing_cases += 1
        collector.add(label, "No response", None, f"{type(err).__name__}: {err}", reproduction)
        return
    report.statuses[response.status_code] += 1
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except FailureGroup as group:
        failures: list[Failure] = list(group.exceptions)
    except Failure as single:
        failures = [single]
    else:
        return
    if response.status_code >= 500:  # one finding: the 5xx, not also its undocumented status
        failures = [f for f in failures if SERVER_ERROR_CHECK in f.checks] or failures[:1]
    report.failing_cases += 1
    for found in failures:
        collector.add(label, found.title, response.status_code, found.message, reproduction)


def with_known_values(spec: Mapping[str, Any], values: Mapping[str, Iterable[str]]) -> dict[str, Any]:
    """Return a copy of ``spec`` whose parameters named in ``values`` also draw from real values.

    A random point id almost never exists, so without this the fuzzer mostly sees 404s. Each named
    parameter (path or query, e.g. ``point_id``, ``node``) becomes ``anyOf: [{enum: values}, its
    schema]``: about half the cases use a real id, the rest keep exploring.
    """
    out = copy.deepcopy(dict(spec))
    for item in out["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                known = list(values.get(param["name"], ()))
                if known:
                    param["schema"] = {"anyOf": [{"enum": known}, param["schema"]]}
    return out
