"""benchmarks/cpu_targets.py: a smoke run on the tiny preset prints a verdict for every target."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cpu_targets  # noqa: E402


def test_cpu_targets_quick_prints_every_verdict(capsys):
    code = cpu_targets.main(["--preset", "tiny", "--quick", "--dtypes", "float32",
                             "--block-length", "8"])
    out = capsys.readouterr().out
    verdicts = [line for line in out.splitlines() if "PASS" in line or "FAIL" in line]
    assert len(verdicts) == 4, out  # targets 1, 2, 3 and 4 for float32
    assert code == (1 if any("FAIL" in v for v in verdicts) else 0)
    assert "machine over" in out and "identical tokens" in out and "live rows" in out


def test_profile_names_the_parts_of_a_forward(capsys):
    assert cpu_targets.main(["--preset", "tiny", "--quick", "--dtypes", "float32",
                             "--block-length", "8", "--profile", "--profile-rows", "3"]) == 0
    out = capsys.readouterr().out
    for part in ("lm_head", "moe experts", "attention", "moe router"):
        assert part in out
