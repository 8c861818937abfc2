"""benchmarks/switch_ab.py: a smoke run on the tiny preset times both settings of a switch, round
after round, and leaves the environment as it found it."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import switch_ab  # noqa: E402


@pytest.mark.parametrize("before", [None, "auto"])
def test_switch_ab_times_both_settings_and_restores_the_variable(capsys, monkeypatch, before):
    if before is None:
        monkeypatch.delenv("DMAX_CPU_PACKED_EXPERTS", raising=False)
    else:
        monkeypatch.setenv("DMAX_CPU_PACKED_EXPERTS", before)
    assert switch_ab.main(["DMAX_CPU_PACKED_EXPERTS", "off", "on", "--preset", "tiny",
                           "--rounds", "3", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "DMAX_CPU_PACKED_EXPERTS=off:" in out and "DMAX_CPU_PACKED_EXPERTS=on:" in out
    assert "of 3 rounds" in out
    assert os.environ.get("DMAX_CPU_PACKED_EXPERTS") == before
