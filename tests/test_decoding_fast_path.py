"""The fast path's step: static shapes and buffers on CPU; CUDA-graph replay equals eager (GPU)."""
import pytest
import torch

from dmax_ext.decoding import decode
from dmax_ext.decoding.backends import resolve_ops
from dmax_ext.decoding.cuda_graph import EagerStep, StepTimer
from dmax_ext.decoding.engine import _Decoder
from dmax_ext.decoding.params import make_config
from dmax_ext.model import random_model

PROMPTS = [[5, 9, 33], [7] * 9, [300, 2, 17, 17, 101, 64]]
L = 4


class StaticShapeCheck(EagerStep):
    """Runs the eager step and checks what a CUDA graph relies on: within a block, every later
    step sees the same buffers (same storage, shapes, dtypes) and the same cache tensors."""

    def __init__(self):
        super().__init__(StepTimer(False, torch.device("cpu")))
        self.seen: dict[int, tuple] = {}
        self.replays = 0

    def __call__(self, ops, model, cache, state, write_slot, config):
        fingerprint = tuple((t.data_ptr(), t.shape, t.dtype) for t in vars(state).values()) \
            + tuple(k.data_ptr() for k in cache.keys)
        if write_slot in self.seen:
            assert self.seen[write_slot] == fingerprint
            self.replays += 1
        self.seen[write_slot] = fingerprint
        super().__call__(ops, model, cache, state, write_slot, config)


@pytest.mark.parametrize("mode", ["spd", "threshold"])
def test_step_runs_on_static_buffers(mode):
    # Flat predictions (gain 1): blocks take many steps.
    model = random_model("tiny", dtype=torch.float32, seed=1)
    config = make_config(model.config, mode=mode, gen_length=9, block_length=L, threshold=0.5,
                         accept_threshold=0.9, top_k=2, temperature=0.0, eos_id=None,
                         mask_id=None, seed=None)
    checker = StaticShapeCheck()
    timer = StepTimer(False, torch.device("cpu"))
    with torch.inference_mode():
        out = _Decoder(model, resolve_ops("native"), config, checker, timer).run(PROMPTS)
    assert checker.replays > 0  # some block took three or more steps
    assert out.tokens == decode(model, PROMPTS, gen_length=9, block_length=L, mode=mode,
                                top_k=2).tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["spd", "threshold"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_cuda_graph_equals_eager(mode, sampling):
    model = random_model("tiny", device="cuda", dtype=torch.float32, lm_head_gain=200.0, seed=1)
    kwargs = dict(gen_length=12, block_length=L, mode=mode, **sampling)
    graphed = decode(model, PROMPTS, cuda_graphs=True, **kwargs)
    eager = decode(model, PROMPTS, cuda_graphs=False, **kwargs)
    assert graphed.tokens == eager.tokens
    assert (graphed.nfe, graphed.seq_nfe, graphed.block_steps) == \
        (eager.nfe, eager.seq_nfe, eager.block_steps)
