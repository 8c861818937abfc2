"""benchmarks/build_ab.py: a smoke run on the tiny preset with this checkout as both builds
(each in a worker process of its own, taking turns); a folder without the package is refused."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import build_ab  # noqa: E402


def test_build_ab_times_both_builds_in_turns(capsys):
    package = ROOT / "python"
    assert build_ab.main([str(package), str(package), "--preset", "tiny", "--rounds", "3",
                          "--repeats", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"A {package}:" in out and f"B {package}:" in out and "of 3 rounds" in out


def test_a_folder_without_the_package_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no dmax_ext package"):
        build_ab.main([str(tmp_path), str(ROOT / "python"), "--rounds", "1"])


def test_the_decode_workload(capsys):
    package = ROOT / "python"
    assert build_ab.main([str(package), str(package), "--preset", "tiny", "--rounds", "2",
                          "--repeats", "1", "--workload", "decode", "--prompts", "1",
                          "--gen-length", "16"]) == 0
    out = capsys.readouterr().out
    assert "decode (batch 1, 16 tokens), ms per token" in out and f"B {package}:" in out
