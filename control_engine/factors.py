"""Emission factor library: a versioned data file of CO2 factors, validated once and queried in memory.

The ledger turns energy into CO2 with one factor per carrier, region and time. This module loads those
factors from ``control_engine/data/emission_factors.yaml`` (or a file the site names), applies site
overrides, and answers two questions: *which factors exist* (:meth:`FactorLibrary.query`, exported
as CSV or JSON for the API) and *which factor applies to this reading* (:meth:`FactorLibrary.in_force`).

Design
------
- **Validated at load, frozen afterwards.** Every factor is a frozen pydantic model; a bad file raises
  :class:`~scada.model.ConfigError` naming the file and the field, like the site loader
  (``emission_factors.yaml: factors[3] (diesel-default).value: ...``). Factors of one carrier,
  region and variant must not overlap in time, so :meth:`FactorLibrary.in_force` never has to guess.
- **Fuel factors are derived, not typed.** A fuel entry stores its GB/T 32150-2015 parameters (net
  calorific value, carbon content per unit heat, oxidation rate); :func:`fuel_factor` computes
  ``NCV x CC x OF x 44/12`` with exact rational arithmetic and records the arithmetic in
  ``derivation``, so an auditor can check every digit.
- **Validity is a half-open interval of local dates.** ``valid_from`` is inclusive, ``valid_to``
  exclusive, a missing bound is open; dates are calendar days in the library's ``timezone``
  (Asia/Shanghai for the Chinese factors), because a grid factor covers a local calendar year.
- **One fallback rule.** :meth:`FactorLibrary.in_force` uses the regional factor in force at that
  instant; if the region has none, the national one; if there is none either, it raises
  :class:`~scada.model.NotFound`. Storage has no factor: a battery carries the intensity of whatever
  charged it, which only the ledger knows.

Loading reads one small file synchronously: do it at startup (or in ``asyncio.to_thread``), not on the
event loop.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scada.model import ID_PATTERN, Carrier, ConfigError, NotFound

__all__ = [
    "CSV_COLUMNS",
    "NATIONAL",
    "ChangelogEntry",
    "EmissionFactor",
    "FactorLibrary",
    "FuelFactor",
    "FuelParameters",
    "fuel_factor",
]

NATIONAL = "national"
"""Region id of the national factors, the fallback of every region."""

SITE_OVERRIDE_SOURCE = "site override"
"""The ``source`` of every factor that came from a site override."""

CSV_COLUMNS: tuple[str, ...] = (
    "id",
    "carrier",
    "scope",
    "value",
    "unit",
    "year",
    "region",
    "variant",
    "valid_from",
    "valid_to",
    "source",
    "note",
    "ncv",
    "ncv_unit",
    "carbon_content_tc_per_tj",
    "oxidation",
    "derivation",
)
"""Column order of :meth:`FactorLibrary.to_csv` and key order of :meth:`FactorLibrary.to_json`."""

_DEFAULT_FILE = "emission_factors.yaml"
_CO2_PER_C = Fraction(44, 12)
"""Mass of CO2 per mass of carbon (molar masses 44 and 12)."""

# NCV unit -> (activity units per NCV denominator, activity unit). tC/TJ equals kgC/GJ, so
# NCV [GJ/unit] x CC [kgC/GJ] x OF x 44/12 is kgCO2 per unit of fuel.
_NCV_UNITS: dict[str, tuple[int, str]] = {
    "GJ/t": (1, "t"),
    "GJ/Nm3": (1, "Nm3"),
    "GJ/10^4Nm3": (10_000, "Nm3"),
}
NcvUnit = Literal["GJ/t", "GJ/Nm3", "GJ/10^4Nm3"]
FactorUnit = Literal["kgCO2/kWh", "kgCO2/GJ", "kgCO2/t", "kgCO2/Nm3"]

_SCOPE_BY_CARRIER: dict[Carrier, int] = {
    Carrier.ELECTRICITY: 2,
    Carrier.PV: 2,
    Carrier.HEAT: 2,
    Carrier.NATURAL_GAS: 1,
    Carrier.DIESEL: 1,
    Carrier.GASOLINE: 1,
    Carrier.FUEL_OIL: 1,
    Carrier.LPG: 1,
    Carrier.COAL: 1,
    Carrier.COKE: 1,
}
_UNITS_BY_CARRIER: dict[Carrier, frozenset[str]] = {
    Carrier.ELECTRICITY: frozenset({"kgCO2/kWh"}),
    Carrier.PV: frozenset({"kgCO2/kWh"}),
    Carrier.HEAT: frozenset({"kgCO2/GJ"}),
    Carrier.NATURAL_GAS: frozenset({"kgCO2/Nm3", "kgCO2/GJ"}),
    **{c: frozenset({"kgCO2/t", "kgCO2/GJ"}) for c in (Carrier.DIESEL, Carrier.GASOLINE, Carrier.FUEL_OIL)},
    Carrier.LPG: frozenset({"kgCO2/t", "kgCO2/Nm3", "kgCO2/GJ"}),
    Carrier.COAL: frozenset({"kgCO2/t", "kgCO2/GJ"}),
    Carrier.COKE: frozenset({"kgCO2/t", "kgCO2/GJ"}),
}
_DEFAULT_VARIANT: dict[Carrier, str] = {Carrier.ELECTRICITY: "average"}
"""The variant :meth:`FactorLibrary.in_force` picks when none is asked for ("default" otherwise)."""

Id = Annotated[str, Field(pattern=rf"^{ID_PATTERN}$")]


# --------------------------------------------------------------------------------------------------
# GB/T 32150 arithmetic


@dataclass(frozen=True, slots=True)
class FuelFactor:
    """A fuel's CO2 factor per unit of activity, with the arithmetic that produced it."""

    value: float
    """kgCO2 per ``unit`` of fuel burnt."""
    unit: str
    """``kgCO2/t`` or ``kgCO2/Nm3``."""
    derivation: str
    """The computation, written out so it can be checked by hand."""


def fuel_factor(ncv: float, ncv_unit: str, carbon_content_tc_per_tj: float, oxidation: float) -> FuelFactor:
    """Return a fuel's CO2 factor by the GB/T 32150-2015 method: NCV x CC x OF x 44/12.

    ``ncv`` is the net calorific value in ``ncv_unit`` (``GJ/t``, ``GJ/Nm3`` or ``GJ/10^4Nm3``, the
    last turned into GJ/Nm3 by dividing by 10^4); ``carbon_content_tc_per_tj`` the carbon per unit
    heat (tC/TJ, the same number as kgC/GJ); ``oxidation`` the fraction of carbon oxidised (0.99,
    not 99). The product is computed exactly on the decimal values as written (rationals, no binary
    rounding on the way) and rounded to a float once, at the end.

    >>> gas = fuel_factor(389.31, "GJ/10^4Nm3", 15.3, 0.99)
    >>> round(gas.value, 9), gas.unit
    (2.162188809, 'kgCO2/Nm3')
    >>> round(fuel_factor(42.652, "GJ/t", 20.2, 0.98).value, 6)
    3095.909637
    """
    if ncv_unit not in _NCV_UNITS:
        raise ValueError(f"unknown NCV unit {ncv_unit!r}: expected one of {', '.join(_NCV_UNITS)}")
    if not ncv > 0:
        raise ValueError(f"NCV must be positive, got {ncv}")
    if not carbon_content_tc_per_tj > 0:
        raise ValueError(f"carbon content must be positive, got {carbon_content_tc_per_tj}")
    if not 0 < oxidation <= 1:
        raise ValueError(f"oxidation is a fraction in (0, 1] (write 0.99, not 99), got {oxidation}")
    per, activity_unit = _NCV_UNITS[ncv_unit]
    # repr() of a float is the shortest decimal that round-trips: exactly what the file said.
    ncv_gj = Fraction(repr(float(ncv))) / per
    cc = Fraction(repr(float(carbon_content_tc_per_tj)))
    ox = Fraction(repr(float(oxidation)))
    exact = ncv_gj * cc * ox * _CO2_PER_C
    value = float(exact)
    ncv_text = f"{ncv:g} {ncv_unit}" + (f" = {float(ncv_gj):g} GJ/{activity_unit}" if per != 1 else "")
    derivation = (
        f"{ncv_text} x {carbon_content_tc_per_tj:g} tC/TJ x {oxidation:g} x 44/12"
        f" = {value:.12g} kgCO2/{activity_unit}"
    )
    return FuelFactor(value=value, unit=f"kgCO2/{activity_unit}", derivation=derivation)


# --------------------------------------------------------------------------------------------------
# Models


class FuelParameters(BaseModel):
    """GB/T 32150-2015 parameters of one fuel: the inputs of :func:`fuel_factor`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ncv: float = Field(gt=0)
    """Net calorific value, in ``ncv_unit``."""
    ncv_unit: NcvUnit
    carbon_content_tc_per_tj: float = Field(gt=0, le=100)
    oxidation: float = Field(gt=0, le=1)
    """Carbon oxidation rate as a fraction (0.99)."""


class EmissionFactor(BaseModel):
    """One CO2 emission factor: how much CO2 one unit of a carrier stands for, where and when.

    Fuel factors carry ``gbt32150`` parameters; their ``value``, ``unit`` and ``derivation`` are
    computed from them and must not be given in the file.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Id
    carrier: Carrier
    scope: Literal[1, 2]
    gbt32150: FuelParameters | None = None
    """GB/T 32150 parameters of a fuel; declared before ``value`` so that their errors come first."""
    value: float = Field(ge=0, allow_inf_nan=False)
    unit: FactorUnit
    year: int | None = Field(default=None, ge=1990, le=2100)
    """Reference year of the data; None for definitional factors (on-site PV)."""
    region: Id = NATIONAL
    variant: Id = "default"
    valid_from: date | None = None
    """First local day in force (inclusive); None: since always."""
    valid_to: date | None = None
    """First local day no longer in force (exclusive); None: until replaced."""
    source: str = Field(min_length=1)
    note: str = ""
    derivation: str = ""

    @model_validator(mode="before")
    @classmethod
    def _derive_fuel_value(cls, data: Any) -> Any:
        """Default the variant by carrier; compute a fuel's value, unit and derivation from ``gbt32150``."""
        if not isinstance(data, Mapping):
            return data
        if "variant" not in data:
            carrier = data.get("carrier")
            data = {**data, "variant": "average" if carrier == Carrier.ELECTRICITY else "default"}
        if data.get("gbt32150") is None:
            if data.get("derivation"):
                raise ValueError("'derivation' is computed from 'gbt32150' parameters; remove it")
            return data
        given = [key for key in ("value", "unit", "derivation") if key in data]
        if given:
            raise ValueError(
                f"{' and '.join(repr(k) for k in given)} {'is' if len(given) == 1 else 'are'} derived from "
                "'gbt32150' parameters; remove it or remove 'gbt32150'"
            )
        try:
            params = FuelParameters.model_validate(data["gbt32150"])
        except ValidationError:
            return data  # field validation reports the bad parameter, under gbt32150.<field>
        derived = fuel_factor(params.ncv, params.ncv_unit, params.carbon_content_tc_per_tj, params.oxidation)
        return {
            **data,
            "gbt32150": params,
            "value": derived.value,
            "unit": derived.unit,
            "derivation": derived.derivation,
        }

    @field_validator("carrier")
    @classmethod
    def _has_factor(cls, carrier: Carrier) -> Carrier:
        if carrier is Carrier.STORAGE:
            raise ValueError("storage has no factor: it carries the intensity of what charged it")
        if carrier is Carrier.NONE:
            raise ValueError("carrier 'none' is not an energy carrier")
        return carrier

    @model_validator(mode="after")
    def _check_consistency(self) -> EmissionFactor:
        if self.scope != _SCOPE_BY_CARRIER[self.carrier]:
            raise ValueError(
                f"scope {self.scope} does not fit carrier {self.carrier}: expected scope "
                f"{_SCOPE_BY_CARRIER[self.carrier]}"
            )
        allowed = _UNITS_BY_CARRIER[self.carrier]
        if self.unit not in allowed:
            raise ValueError(
                f"unit {self.unit} does not fit carrier {self.carrier}: expected {', '.join(sorted(allowed))}"
            )
        if self.valid_from is not None and self.valid_to is not None and self.valid_to <= self.valid_from:
            raise ValueError(f"valid_to {self.valid_to} must be after valid_from {self.valid_from}")
        return self

    def covers(self, day: date) -> bool:
        """Return True when this factor is in force on local calendar day ``day``."""
        return (self.valid_from is None or self.valid_from <= day) and (
            self.valid_to is None or day < self.valid_to
        )

    def record(self) -> dict[str, str | int | float | None]:
        """Return the factor as one flat record, keys in :data:`CSV_COLUMNS` order (for export)."""
        fuel = self.gbt32150
        return {
            "id": self.id,
            "carrier": self.carrier.value,
            "scope": self.scope,
            "value": self.value,
            "unit": self.unit,
            "year": self.year,
            "region": self.region,
            "variant": self.variant,
            "valid_from": self.valid_from.isoformat() if self.valid_from else None,
            "valid_to": self.valid_to.isoformat() if self.valid_to else None,
            "source": self.source,
            "note": self.note,
            "ncv": fuel.ncv if fuel else None,
            "ncv_unit": fuel.ncv_unit if fuel else None,
            "carbon_content_tc_per_tj": fuel.carbon_content_tc_per_tj if fuel else None,
            "oxidation": fuel.oxidation if fuel else None,
            "derivation": self.derivation,
        }


class ChangelogEntry(BaseModel):
    """One release of the data file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1)
    date: date
    changes: str = Field(min_length=1)


class _FactorFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1, strict=True)  # "2024.1", quoted: unquoted it is a float
    timezone: str = "Asia/Shanghai"
    changelog: tuple[ChangelogEntry, ...] = Field(min_length=1)
    factors: tuple[EmissionFactor, ...] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown time zone {value!r}") from err
        return value

    @model_validator(mode="after")
    def _version_logged(self) -> _FactorFile:
        if self.version not in {entry.version for entry in self.changelog}:
            raise ValueError(f"version {self.version!r} has no changelog entry")
        return self


class _OverrideList(BaseModel):
    model_config = ConfigDict(frozen=True)

    overrides: tuple[EmissionFactor, ...]


# --------------------------------------------------------------------------------------------------
# The library


class FactorLibrary:
    """The emission factors in use: the packaged (or named) data file plus site overrides.

    Immutable: :meth:`with_overrides` returns a new library.
    """

    __slots__ = ("_changelog", "_factors", "_source", "_timezone", "_version")

    def __init__(
        self,
        factors: Sequence[EmissionFactor],
        *,
        version: str,
        timezone: str = "Asia/Shanghai",
        changelog: Sequence[ChangelogEntry] = (),
        source: str = "<factors>",
    ) -> None:
        problem = _check_library(factors)
        if problem is not None:
            where, message = problem
            raise ConfigError(f"{source}: {where}: {message}")
        self._factors = tuple(factors)
        self._version = version
        self._timezone = ZoneInfo(timezone)
        self._changelog = tuple(changelog)
        self._source = source

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> FactorLibrary:
        """Read and validate a factor file (the packaged one by default).

        The packaged library is read and validated once per process (it is immutable), however often
        the site loader and the server ask for it. Raise :class:`ConfigError` naming the file and
        the first bad field.
        """
        if path is None:
            return _packaged_library()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{path}: cannot read factor file: {err.strerror}") from err
        return cls.parse(text, source=path.name)

    @classmethod
    def parse(cls, text: str, *, source: str = "<factors>") -> FactorLibrary:
        """Validate a factor document given as YAML text; ``source`` names it in errors.

        >>> FactorLibrary.parse("[]")
        Traceback (most recent call last):
        ...
        scada.model.ConfigError: <factors>: expected a mapping with 'version', 'changelog' and 'factors'
        """
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError.of_yaml(source, err) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with 'version', 'changelog' and 'factors'")
        try:
            document = _FactorFile.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise ConfigError.at(source, first["loc"], raw, first["msg"]) from None
        return cls(
            document.factors,
            version=document.version,
            timezone=document.timezone,
            changelog=document.changelog,
            source=source,
        )

    def with_overrides(
        self,
        overrides: Iterable[Mapping[str, Any]],
        *,
        source: str = "site overrides",
        field_name: str = "overrides",
    ) -> FactorLibrary:
        """Return a library with site overrides applied; this one is unchanged.

        Each override is a mapping of factor fields. It replaces the factor with the same ``id``,
        or else the one with the same carrier, region, variant and year; fields it leaves out are
        kept from the factor it replaces (so ``{id: diesel-default, gbt32150: {ncv: 43.1}}``
        changes only the measured NCV). An override that matches nothing is added and must be
        complete. Every override is validated like the data file, with ``source: site override``
        (a ``source`` it gave is kept in the note as its basis). Errors name ``source`` and
        ``<field_name>[i].field``, so a site file can name its own list (``emission_factors[0]...``).
        """
        factors = list(self._factors)
        raw_list: list[dict[str, Any]] = []
        for override in overrides:
            if not isinstance(override, Mapping):
                raise ConfigError(
                    f"{source}: {field_name}[{len(raw_list)}]: expected a mapping of factor fields"
                )
            raw_list.append(self._merge_override(dict(override), factors))
        try:
            validated = _OverrideList.model_validate({"overrides": raw_list}).overrides
        except ValidationError as err:
            first = err.errors()[0]
            loc = (field_name, *first["loc"][1:])  # the list is validated as "overrides"
            raise ConfigError.at(source, loc, {field_name: raw_list}, first["msg"]) from None
        for factor in validated:
            index = _match(
                factors,
                factor_id=factor.id,
                carrier=factor.carrier,
                region=factor.region,
                variant=factor.variant,
                year=factor.year,
            )
            if index is None:
                factors.append(factor)
            else:
                factors[index] = factor
        problem = _check_library(factors, {f.id: f"{field_name}[{k}]" for k, f in enumerate(validated)})
        if problem is not None:
            raise ConfigError(f"{source}: {problem[0]}: {problem[1]}")
        return FactorLibrary(
            factors,
            version=self._version,
            timezone=self._timezone.key,
            changelog=self._changelog,
            source=f"{self._source} + {source}",
        )

    @staticmethod
    def _merge_override(override: dict[str, Any], factors: Sequence[EmissionFactor]) -> dict[str, Any]:
        """Fill an override's missing fields from the factor it replaces and mark it as a site override."""
        carrier = override.get("carrier")
        index = _match(
            factors,
            factor_id=override.get("id"),
            carrier=carrier,
            region=override.get("region", NATIONAL),
            variant=override.get("variant", "average" if carrier == Carrier.ELECTRICITY else "default"),
            year=override.get("year"),
        )
        merged: dict[str, Any] = {}
        if index is not None:
            merged = factors[index].model_dump(exclude={"derivation"}, exclude_none=True)
            if "value" in override or "unit" in override:
                merged.pop("gbt32150", None)  # a measured factor replaces the derived one
            elif "gbt32150" in override:
                merged.pop("value", None)
                merged.pop("unit", None)
                if isinstance(override["gbt32150"], Mapping) and "gbt32150" in merged:
                    override = {**override, "gbt32150": {**merged["gbt32150"], **override["gbt32150"]}}
            elif "gbt32150" in merged:
                merged.pop("value", None)
                merged.pop("unit", None)
        merged.update(override)
        if "note" not in override:
            # the replaced factor's note describes its own basis, not the site's
            merged["note"] = (
                f"Replaces {factors[index].id} ({factors[index].source})." if index is not None else ""
            )
        basis = override.get("source")
        if isinstance(basis, str) and basis and basis != SITE_OVERRIDE_SOURCE:
            merged["note"] = f"{merged['note']} Basis: {basis}".strip()
        merged["source"] = SITE_OVERRIDE_SOURCE
        return merged

    # -- questions ------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """Return the data file's version, e.g. ``"2024.1"``."""
        return self._version

    @property
    def changelog(self) -> tuple[ChangelogEntry, ...]:
        """Return the data file's releases, as written."""
        return self._changelog

    @property
    def timezone(self) -> ZoneInfo:
        """Return the zone whose calendar days the validity dates count in."""
        return self._timezone

    @property
    def factors(self) -> tuple[EmissionFactor, ...]:
        """Return every factor, in file order with added overrides last."""
        return self._factors

    def get(self, factor_id: str) -> EmissionFactor:
        """Return the factor with this id or raise :class:`NotFound`."""
        for factor in self._factors:
            if factor.id == factor_id:
                return factor
        raise NotFound(f"no emission factor {factor_id!r}")

    def query(
        self,
        carrier: Carrier | str | None = None,
        year: int | None = None,
        region: str | None = None,
        scope: int | None = None,
        variant: str | None = None,
    ) -> tuple[EmissionFactor, ...]:
        """Return the factors matching every given filter, in library order (None: any)."""
        return tuple(
            f
            for f in self._factors
            if (carrier is None or f.carrier == carrier)
            and (year is None or f.year == year)
            and (region is None or f.region == region)
            and (scope is None or f.scope == scope)
            and (variant is None or f.variant == variant)
        )

    def in_force(
        self, carrier: Carrier | str, at: datetime, region: str = NATIONAL, *, variant: str | None = None
    ) -> EmissionFactor:
        """Return the factor of ``carrier`` in force at ``at`` for ``region``.

        The rule: the factor of ``region`` whose validity covers the local calendar day of ``at``;
        if that region has none then, the national factor that covers it; otherwise
        :class:`NotFound`. ``variant`` defaults to ``average`` for electricity and ``default`` for
        every other carrier. ``at`` must be timezone-aware.
        """
        if at.tzinfo is None:
            raise ValueError("in_force needs a timezone-aware datetime")
        try:
            carrier = Carrier(carrier)
        except ValueError:
            raise NotFound(f"unknown carrier {carrier!r}") from None
        if carrier is Carrier.STORAGE:
            raise NotFound("storage has no emission factor: it carries the intensity of what charged it")
        wanted = variant or _DEFAULT_VARIANT.get(carrier, "default")
        day = at.astimezone(self._timezone).date()
        for candidate_region in (region, NATIONAL) if region != NATIONAL else (NATIONAL,):
            for factor in self._factors:
                if (
                    factor.carrier is carrier
                    and factor.region == candidate_region
                    and factor.variant == wanted
                    and factor.covers(day)
                ):
                    return factor
        raise NotFound(
            f"no {wanted} emission factor for {carrier} in force on {day.isoformat()} "
            f"({self._timezone.key}) for region {region!r} or {NATIONAL!r}"
        )

    # -- export ---------------------------------------------------------------------------------

    def to_csv(self, factors: Iterable[EmissionFactor] | None = None) -> str:
        """Return factors (all by default) as CSV with the columns of :data:`CSV_COLUMNS`.

        Empty cells stand for "none"; values are written as shortest round-trip decimals.
        """
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for factor in self._factors if factors is None else factors:
            writer.writerow({k: "" if v is None else v for k, v in factor.record().items()})
        return out.getvalue()

    def to_json(self, factors: Iterable[EmissionFactor] | None = None) -> str:
        """Return ``{"version": ..., "factors": [...]}`` with records keyed in :data:`CSV_COLUMNS` order."""
        records = [factor.record() for factor in (self._factors if factors is None else factors)]
        return json.dumps({"version": self._version, "factors": records}, ensure_ascii=False, indent=2)


# --------------------------------------------------------------------------------------------------
# Helpers


def _match(
    factors: Sequence[EmissionFactor],
    *,
    factor_id: Any,
    carrier: Any,
    region: Any,
    variant: Any,
    year: Any,
) -> int | None:
    """Return the index of the factor an override replaces: same id, else same carrier/region/variant/year."""
    for index, factor in enumerate(factors):
        if factor_id is not None and factor.id == factor_id:
            return index
    if carrier is None:
        return None
    for index, factor in enumerate(factors):
        if (
            factor.carrier == carrier
            and factor.region == region
            and factor.variant == variant
            and factor.year == year
        ):
            return index
    return None


def _check_library(
    factors: Sequence[EmissionFactor], labels: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """Return (where, problem) for the first duplicate id or overlapping validity, else None.

    ``labels`` names factors by id (``overrides[2]``) where their list index would mislead; an
    overlap between an override and a file factor is blamed on the override.
    """
    labels = labels or {}

    def where(index: int, factor: EmissionFactor) -> str:
        return f"{labels.get(factor.id, f'factors[{index}]')} ({factor.id})"

    seen: dict[str, int] = {}
    for index, factor in enumerate(factors):
        if factor.id in seen:
            return (
                f"{where(index, factor)}.id",
                f"duplicate of {where(seen[factor.id], factors[seen[factor.id]])}",
            )
        seen[factor.id] = index
    for index, factor in enumerate(factors):
        for earlier_index in range(index):
            earlier = factors[earlier_index]
            key = (factor.carrier, factor.region, factor.variant)
            if (earlier.carrier, earlier.region, earlier.variant) != key or not _overlaps(earlier, factor):
                continue
            blamed, blamed_index, other = factor, index, earlier
            if earlier.id in labels and factor.id not in labels:
                blamed, blamed_index, other = earlier, earlier_index, factor
            return (
                f"{where(blamed_index, blamed)}.valid_from",
                f"validity overlaps {other.id} ({factor.carrier}, {factor.region}, {factor.variant}); "
                "close the older factor with valid_to",
            )
    return None


@functools.cache
def _packaged_library() -> FactorLibrary:
    resource = resources.files("control_engine").joinpath("data", _DEFAULT_FILE)
    try:
        text = resource.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{_DEFAULT_FILE}: cannot read packaged factor file: {err}") from err
    return FactorLibrary.parse(text, source=_DEFAULT_FILE)


def _overlaps(a: EmissionFactor, b: EmissionFactor) -> bool:
    a_from, b_from = a.valid_from or date.min, b.valid_from or date.min
    a_to, b_to = a.valid_to or date.max, b.valid_to or date.max
    return a_from < b_to and b_from < a_to
