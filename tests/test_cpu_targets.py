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
    assert "machine over" in out and "identical tokens" in out and "ceilings" in out
    # float32 decodes batch-invariantly: the batch-8 line compares one decode
    assert "sequences decoded as alone 8/8" in out
    assert "the rolling schedule:" in out and out.count("decoded as alone 8/8") == 2
    assert "on an H200 at TP 2, a projection" in out


def test_profile_names_the_parts_of_a_forward(capsys):
    assert cpu_targets.main(["--preset", "tiny", "--quick", "--dtypes", "float32",
                             "--block-length", "8", "--profile", "--profile-rows", "3"]) == 0
    out = capsys.readouterr().out
    for part in ("lm_head", "moe experts", "attention", "moe router"):
        assert part in out


def test_batch_ceilings_count_every_forward_of_the_batched_decode():
    import block_forward
    import tps
    model = tps.synthetic_model("tiny", "cpu", cpu_targets.torch.float32)
    prompts = tps.synthetic_prompts(model.config, 3)
    kwargs = dict(gen_length=16, block_length=8, threshold=0.5)
    out, shapes = block_forward.record_forward_shapes(model, prompts, **kwargs)
    assert len(shapes) == out.nfe
    # every forward feeds the rows still decoding: at least one, at most the batch
    assert all(1 <= s.batch <= len(prompts) for s in shapes)
    assert sum(s.batch for s in shapes if s.n_logits) >= sum(out.seq_nfe) - len(prompts)
    c = cpu_targets.batch_ceilings(model, prompts, kwargs, alone_wall_s=1.0)
    assert c["live_rows"] == sum(out.seq_nfe) / out.nfe
    assert c["scheduler_bound"] == sum(out.seq_nfe) / max(out.seq_nfe)
    assert c["batched_gflop"] > 0 and c["peak_gflops"] > 0
    assert abs(c["flops_ceiling"] - 1.0 / (c["batched_gflop"] / c["peak_gflops"])) < 1e-9
