"""Two gloo ranks on CPU train exactly what one process trains with the same global batch."""
import pytest
import torch
from test_training_trainer import config
from training_fixtures import synthetic_data, tiny_model

from dmax_ext.distributed import init_tensor_parallel, spawn_local
from dmax_ext.training import Trainer


def _worker(out_dir: str, fsdp: bool) -> None:
    """One rank, launched by spawn_local (torchrun's environment), which leaves the group after
    this returns, the trainer out of scope."""
    init_tensor_parallel("cpu")
    trainer = Trainer(tiny_model(), synthetic_data(16, 24),
                      config(micro_batch=2, max_steps=2, fsdp=fsdp), out_dir)
    trainer.train()
    trainer.save_final()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_match_one_process(tmp_path, fsdp):
    from dmax_ext.model import load_model
    single = tiny_model()
    Trainer(single, synthetic_data(16, 24), config(micro_batch=4, max_steps=2), tmp_path / "one").train()
    assert spawn_local(_worker, 2, str(tmp_path / "two"), fsdp) == 0
    both = load_model(tmp_path / "two" / "final", dtype=torch.float32)
    for (name, a), b in zip(single.state_dict().items(), both.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # the checkpoint written by rank 0 resumes in a single process
    resumed = Trainer(tiny_model(seed=3), synthetic_data(16, 24), config(micro_batch=4, max_steps=2),
                      tmp_path / "two", resume="auto")
    assert resumed.step == 2
