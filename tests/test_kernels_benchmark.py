"""benchmarks/kernels.py: its quick CPU run verifies every row against its reference and prints
a timing line for each."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernels  # noqa: E402


def test_quick_run_verifies_and_times_every_row(capsys):
    kernels.main(["--quick", "--device", "cpu", "--verify"])
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in kernels.BENCHES]
    assert rows == list(kernels.BENCHES), out
    assert "block_attention" in rows  # against SDPA too: its "plain" column
