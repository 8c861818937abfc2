"""benchmarks/tps.py --quick runs both paths on CPU and writes its JSON report."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tps  # noqa: E402


def test_tps_quick_synthetic(tmp_path, capsys):
    out = tmp_path / "tps.json"
    assert tps.main(["--synthetic", "tiny", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["graphs_verified"] is None
    assert 0 <= report["identical_to_reference"] <= report["prompts"] == 2
    assert [r["ops"] for r in report["results"]] == ["native", "reference"]
    for r in report["results"]:
        assert r["forwards_per_s"] > 0 and r["tokens_per_s"] > 0 and r["tpf"] > 0
        assert 0 < r["outside_forward_share"] < 1
    forward = report["block_forward"]  # the roofline of this configuration, measured this run
    assert forward["copy_gbps"] > 0 and forward["floor_ms"] > 0 and forward["measured_ms"] > 0
    assert 1 <= forward["distinct_experts"] <= 16
    table = capsys.readouterr().out
    assert "device: cpu" in table
    assert "fast (native, eager)" in table and "reference (eager)" in table
    assert "roofline (this run" in table and "block forward: measured" in table


def test_tps_quick_checkpoint_with_prompt_file(tmp_path, capsys):
    from decoding_fixtures import write_chat_checkpoint
    path = write_chat_checkpoint(tmp_path / "tiny")
    assert tps.main(["--model", str(path), "--quick", "--mode", "threshold", "--batch", "2",
                     "--scheduler", "rolling", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert f"model: {path}" in table
    assert "mode: threshold  batch: 2  scheduler: rolling  prompts: 2" in table


def test_schedules_counts_each_schedules_forwards(tmp_path, capsys):
    import schedules
    assert schedules.main(["--preset", "tiny", "--prompts", "5", "--batch", "2", "--gen-length",
                           "16", "--block-length", "8", "--dtype", "float32", "--plot",
                           str(tmp_path / "rows.png")]) == 0
    assert (tmp_path / "rows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
            if line.startswith(("one by one", "lockstep", "rolling"))}
    assert set(rows) == {"one by one", "lockstep, groups of 2", "rolling, 2 at once"}
    for cells in rows.values():  # float32 decodes batch-invariantly: every sequence as alone
        assert "5/5" in cells
    assert "(projection)" in out and "schedules: tiny (synthetic weights)" in out


def test_schedules_on_a_checkpoint_folder(tmp_path, capsys):
    import schedules
    from checkpoints import write_tiny_checkpoint
    path = write_tiny_checkpoint(tmp_path / "tiny", lm_head_gain=60.0)
    assert schedules.main(["--model", str(path), "--prompts", "3", "--batch", "2",
                           "--gen-length", "8", "--block-length", "4", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"schedules: {path}" in out and "3/3" in out and "cpu tok/s" in out
