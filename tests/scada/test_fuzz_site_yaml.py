"""Fuzz the site file loader: any YAML text either loads or raises ConfigError naming the field.

``parse_site`` (which also validates the ``control:`` section through
``control_engine.control_config.parse_control``) is the one way a site file enters the server.
Engineers edit these files by hand, so a typo must come back as :class:`ConfigError` with the file
and the field path (``plant.yaml: devices[3] (a-boiler).points[0] (gas_nm3).scale: ...``), never as
another exception or a bare traceback. Inputs: arbitrary text, arbitrary YAML documents, and
mutations of ``examples/plant.yaml`` (a key dropped, a value of the wrong type, a bad enum value, a
negative number, an item duplicated so that its id is not unique).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scada.config import SiteConfig, parse_site
from scada.model import ConfigError

SOURCE = "fuzz.yaml"
PLANT_YAML = Path(__file__).resolve().parents[2] / "examples" / "plant.yaml"
PLANT = yaml.load(PLANT_YAML.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
TOP_LEVEL = frozenset(SiteConfig.model_fields) | {"document"}
_MESSAGE_RE = re.compile(
    rf"^{re.escape(SOURCE)}(?::\d+:\d+)?: (?P<where>[^\n]+?): (?P<why>\S[^\n]*)$", re.DOTALL
)

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MUTATION_SETTINGS = settings(FUZZ_SETTINGS, max_examples=25)  # the plant file takes 0.1-0.3 s to parse

# --------------------------------------------------------------------------------------------------
# Strategies

YAML_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["", "bogus", "-1", "2001-13-45", "modbus_tcp", "group", "kW", "Asia/Nowhere"])
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
SITE_KEYS = st.sampled_from(sorted(TOP_LEVEL - {"document"}))
SITE_LIKE = st.dictionaries(SITE_KEYS | st.text(max_size=6), YAML_VALUES, max_size=6)
REPLACEMENTS: st.SearchStrategy[Any] = (
    st.sampled_from([None, "bogus", -1, -1.5, 0, 10**30, "", [], {}, True, "x" * 2000, 1e308, "-"])
    | YAML_SCALARS
    | YAML_VALUES
)
YAML_TEXT = (
    st.text(max_size=200)
    | YAML_VALUES.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))
    | SITE_LIKE.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))
)


def _containers(node: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Return the path of every mapping and list in ``node``, the root included."""
    paths = [path]
    items: Any = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        if isinstance(child, dict | list):
            paths.extend(_containers(child, (*path, key)))
    return paths


PLANT_CONTAINERS = _containers(PLANT)


def _at(doc: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def plant_mutations(draw: st.DrawFn) -> tuple[str, tuple[str | int, ...], dict[str, Any]]:
    """Return (what, where, document): examples/plant.yaml with one change in one place."""
    doc = copy.deepcopy(PLANT)
    path = draw(st.sampled_from(PLANT_CONTAINERS))
    node = _at(doc, path)
    keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return "none", path, doc
    key = draw(st.sampled_from(keys))
    what = draw(st.sampled_from(["drop", "replace", "negate", "duplicate", "bad_enum"]))
    value = node[key]
    if what == "drop":
        del node[key]
    elif what == "replace":
        node[key] = draw(REPLACEMENTS)
    elif what == "negate" and isinstance(value, int | float) and not isinstance(value, bool):
        node[key] = -value if value else -1
    elif what == "duplicate" and isinstance(node, list):
        node.append(copy.deepcopy(value))  # the same id twice
    elif what == "bad_enum" and isinstance(value, str):
        node[key] = value + "-bogus"
    else:
        node[key] = draw(REPLACEMENTS)
        what = "replace"
    return what, (*path, key), doc


# --------------------------------------------------------------------------------------------------
# Properties


def load_or_config_error(text: str) -> SiteConfig | ConfigError:
    """Return the loaded site or its ConfigError; any other exception fails the property."""
    try:
        return parse_site(text, source=SOURCE)
    except ConfigError as err:
        check_message(err)
        return err


def check_message(err: ConfigError) -> None:
    """The message is ``<file>[:line:col]: <where>: <why>`` on one line, not a traceback."""
    message = str(err)
    assert "Traceback" not in message
    assert message.startswith(SOURCE), message
    if re.match(rf"^{re.escape(SOURCE)}(:\d+:\d+)?: not valid YAML: \S", message):
        return  # the text does not parse: there is no field yet, the position is given when known
    if message.startswith(f"{SOURCE}: expected a mapping"):
        return  # the document is not a mapping: nothing to point into
    assert _MESSAGE_RE.match(message), message


def check_yaml_text(text: str) -> None:
    """Arbitrary YAML text loads, or raises a ConfigError with a readable message."""
    load_or_config_error(text)


def check_plant_mutation(mutation: tuple[str, tuple[str | int, ...], dict[str, Any]]) -> None:
    """A mutated plant file loads or raises a ConfigError whose location is a path into the file."""
    _what, _where, doc = mutation
    outcome = load_or_config_error(
        yaml.dump(doc, Dumper=yaml.CSafeDumper, allow_unicode=True, sort_keys=False)
    )
    if isinstance(outcome, ConfigError):
        match = _MESSAGE_RE.match(str(outcome))
        assert match is not None, str(outcome)
        head = re.split(r"[.\[ :]", match["where"], maxsplit=1)[0]
        assert head in TOP_LEVEL, str(outcome)


# --------------------------------------------------------------------------------------------------
# Tests


def test_the_example_plant_loads() -> None:
    assert isinstance(load_or_config_error(PLANT_YAML.read_text(encoding="utf-8")), SiteConfig)


@FUZZ_SETTINGS
@given(YAML_TEXT)
@example("")
@example("site")
@example("{" * 200 + "}" * 200)
@example("a: &a [*a]\nsite: *a")
@example("site: {id: s, name: S}\nhierarchy: [{id: g, name: G, level: group}]\ndevices: []\ncontrol: 5")
@example("site: {id: s, name: S}\nhierarchy: [{id: g, name: G, level: group}]\ncontrol: {rules: [5]}")
@example("\x00")
@example("a: !!python/object:os.system [ls]")
def test_any_yaml_text_loads_or_names_the_field(text: str) -> None:
    check_yaml_text(text)


@MUTATION_SETTINGS
@given(plant_mutations())
@example(("drop", ("site",), {k: v for k, v in PLANT.items() if k != "site"}))
def test_mutated_plant_file_loads_or_names_the_field(
    mutation: tuple[str, tuple[str | int, ...], dict[str, Any]],
) -> None:
    check_plant_mutation(mutation)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("site: 2001-13-45", id="impossible-date"),
        pytest.param("site: !!float abc", id="bad-float-tag"),
        pytest.param("site: !!int abc", id="bad-int-tag"),
        pytest.param("site: !!timestamp foo", id="bad-timestamp-tag"),
        pytest.param("site: !!bool maybe", id="bad-bool-tag"),
        pytest.param("[" * 2_000, id="nested-too-deep"),
    ],
)
def test_yaml_constructor_errors_are_config_errors(text: str) -> None:
    check_yaml_text(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            'site: {id: s, name: S}\nhierarchy: [{id: "g\\nx", name: G, level: group}]\ndevices: []',
            id="id-with-a-newline",
        ),
        pytest.param("site: \x00", id="nul-character"),
    ],
)
def test_config_errors_stay_on_one_line(text: str) -> None:
    outcome = load_or_config_error(text)
    assert isinstance(outcome, ConfigError)
    assert "\n" not in str(outcome), str(outcome)
