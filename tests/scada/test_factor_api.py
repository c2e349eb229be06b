"""The emission factor library over the REST API, and site overrides from the site file."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from scada.api.problem import problem_middleware
from scada.api.routes import FACTORS, add_routes
from scada.config import SiteConfig, parse_site
from scada.model import ConfigError

SITE = """
site: {id: s, name: S}
hierarchy: [{id: g, name: G, level: group}]
emission_factors:
  # a measured gas analysis replaces the default NCV; the carbon content and oxidation rate stay
  - {id: natural-gas-default, gbt32150: {ncv: 360.0}, note: "2026 lab analysis of the supplied gas"}
"""


@pytest.fixture
def site() -> SiteConfig:
    return parse_site(SITE)


@pytest.fixture
async def client(site: SiteConfig, aiohttp_client: Callable[[web.Application], Any]) -> Any:
    app = web.Application(middlewares=[problem_middleware])
    app[FACTORS] = site.factor_library()
    add_routes(app)
    return await aiohttp_client(app)


async def test_factors_are_queried_by_energy_type_year_and_region(client: Any) -> None:
    response = await client.get("/api/v1/emission-factors", params={"carrier": "electricity", "year": "2022"})
    assert response.status == 200
    body = await response.json()
    assert body["version"]
    values = {f["region"] + "/" + f["variant"]: f["value"] for f in body["factors"]}
    assert values["national/average"] == 0.5366
    assert values["national/fossil_only"] == 0.8325
    assert values["national/excl_market_non_fossil"] == 0.5856
    assert values["east/average"] == 0.5617
    assert values["southwest/average"] == 0.2268
    east = await (await client.get("/api/v1/emission-factors", params={"region": "east"})).json()
    assert [f["id"] for f in east["factors"]] == ["cn-grid-east-average-2022"]
    scope1 = await (await client.get("/api/v1/emission-factors", params={"scope": "1"})).json()
    assert {f["carrier"] for f in scope1["factors"]} >= {"natural_gas", "diesel", "coal", "coke", "lpg"}


async def test_site_overrides_reach_the_api_and_recompute_the_fuel_factor(client: Any) -> None:
    gas = await (await client.get("/api/v1/emission-factors/natural-gas-default")).json()
    # 360.0 GJ/10^4 Nm3 = 0.036 GJ/Nm3; x 15.3 kgC/GJ = 0.5508 kgC/Nm3; x 0.99 = 0.545292; x 44/12
    # = 1.999404 kgCO2/Nm3
    assert gas["value"] == pytest.approx(0.036 * 15.3 * 0.99 * 44 / 12, rel=1e-9)
    assert gas["source"] == "site override"


async def test_the_library_exports_as_csv(client: Any) -> None:
    response = await client.get("/api/v1/emission-factors", params={"format": "csv", "carrier": "diesel"})
    assert response.status == 200
    assert response.content_type == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert [r["id"] for r in rows] == ["diesel-default"]
    # 42.652 GJ/t x 20.2 kgC/GJ = 861.5704 kgC/t; x 0.98 = 844.338992; x 44/12 = 3095.9096373333 kgCO2/t
    assert float(rows[0]["value"]) == pytest.approx(844.338992 * 44 / 12, rel=1e-9)


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"carrier": "plutonium"}, "unknown energy type"),
        ({"year": "twenty"}, "year: not an integer"),
        ({"scope": "3"}, "scope: must be within"),
        ({"format": "xml"}, "is not json or csv"),
    ],
)
async def test_bad_queries_are_problems(client: Any, params: dict[str, str], detail: str) -> None:
    response = await client.get("/api/v1/emission-factors", params=params)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert detail in (await response.json())["detail"]


async def test_an_unknown_factor_is_404(client: Any) -> None:
    response = await client.get("/api/v1/emission-factors/no-such-factor")
    assert response.status == 404
    assert response.content_type == "application/problem+json"


def test_a_bad_override_fails_at_load_naming_the_field() -> None:
    text = SITE.replace("ncv: 360.0", "ncv: -1")
    with pytest.raises(ConfigError, match=r"<site>: emission_factors\[0\] \(natural-gas-default\)"):
        parse_site(text)
