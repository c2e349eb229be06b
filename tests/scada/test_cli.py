"""The ``scada`` command: check-config exit codes and messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from scada.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plant.yaml"


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "OK: site 'suzhou-demo'" in out
    assert "41 devices" in out


def test_check_config_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        EXAMPLE.read_text(encoding="utf-8").replace("unit_id: 3}", "unit_id: 999}", 1), encoding="utf-8"
    )
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: devices[" in err
    assert "(b-line-2).modbus.unit_id: Input should be less than or equal to 255" in err


def test_invalid_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SCADA_HTTP_PORT", "eighty")
    assert main(["check-config", str(EXAMPLE)]) == 2
    assert "SCADA_HTTP_PORT" in capsys.readouterr().err
