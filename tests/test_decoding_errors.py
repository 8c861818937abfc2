"""decode() rejects bad input before any forward, with an error naming the argument."""
import math

import pytest
import torch
from decoding_stub import VOCAB, StubModel

from dmax_ext.decoding import decode

PROMPT = [[1, 2, 3]]


@pytest.mark.parametrize("input_ids, error, message", [
    ([], ValueError, "input_ids: the batch is empty"),
    ([[1, 2], []], ValueError, "input_ids: prompt 1 is empty"),
    (torch.zeros(2, 0, dtype=torch.int64), ValueError, "input_ids: prompt 0 is empty"),
    ([[1, VOCAB]], ValueError, f"input_ids: prompt 0 holds id {VOCAB}, outside [0, {VOCAB})"),
    ([[3], [1, -1]], ValueError, "input_ids: prompt 1 holds id -1"),
    (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids must hold integer token ids"),
    (torch.zeros(1, 1, 2, dtype=torch.int64), ValueError, "input_ids must be [batch, prompt]"),
    ([[1], "ab"], TypeError, "input_ids[1] must be a list of ints or a 1-D tensor"),
    ("hello", TypeError, "input_ids must be a tensor or a list of id lists"),
    ([torch.tensor([1, 2]), torch.tensor([3], device="meta")], ValueError,
     "input_ids: the prompts' tensors are on different devices"),
    (torch.tensor([[1, 2]], device="meta"), ValueError,
     "input_ids is on meta but the model is on cpu"),
    ([torch.tensor([1, 2], device="meta")], ValueError,
     "input_ids[0] is on meta but the model is on cpu"),
])
def test_bad_input_ids(input_ids, error, message):
    model = StubModel(lambda block, step: None, 4)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        decode(model, input_ids, gen_length=4, block_length=4, ops="reference")
    assert model.calls == []


@pytest.mark.parametrize("kwargs, error, message", [
    ({"gen_length": 0}, ValueError, "gen_length must be >= 1, got 0"),
    ({"gen_length": 2.5}, TypeError, "gen_length must be an int"),
    ({"block_length": 0}, ValueError, "block_length must be >= 1, got 0"),
    ({"threshold": -0.1}, ValueError, r"threshold must be in \[0, 1\], got -0.1"),
    ({"threshold": 1.01}, ValueError, r"threshold must be in \[0, 1\]"),
    ({"threshold": math.nan}, ValueError, r"threshold must be in \[0, 1\]"),
    ({"accept_threshold": 2}, ValueError, r"accept_threshold must be in \[0, 1\], got 2"),
    ({"accept_threshold": "high"}, TypeError, "accept_threshold must be a float"),
    ({"top_k": 0}, ValueError, r"top_k must be in 1..8, got 0"),
    ({"top_k": 9}, ValueError, r"top_k must be in 1..8, got 9"),
    ({"mode": "fast"}, ValueError, r"mode must be one of \['spd', 'threshold'\], got 'fast'"),
    ({"temperature": -1.0}, ValueError, "temperature must be a finite float >= 0"),
    ({"temperature": math.inf}, ValueError, "temperature must be a finite float >= 0"),
    ({"eos_id": VOCAB}, ValueError, f"eos_id must be in 0..{VOCAB - 1}"),
    ({"mask_id": -1}, ValueError, "mask_id must be in"),
    ({"eos_id": 3, "mask_id": 3}, ValueError, "eos_id and mask_id must differ"),
    ({"seed": -5}, ValueError, "seed must be >= 0"),
    ({"ops": "fastest"}, ValueError, r"ops must be one of \['native', 'reference'\]"),
    ({"cuda_graphs": True}, ValueError, "cuda_graphs=True needs a CUDA model"),
])
def test_bad_arguments(kwargs, error, message):
    model = StubModel(lambda block, step: None, 4)
    kwargs = {"gen_length": 4, "block_length": 4, "ops": "reference", **kwargs}
    with pytest.raises(error, match=message):
        decode(model, PROMPT, **kwargs)
    assert model.calls == []


def test_one_flat_prompt_is_a_batch_of_one():
    model = StubModel(lambda block, step: None, 4)
    flat = decode(model, [1, 2, 3], gen_length=1, block_length=4, ops="reference")
    nested = decode(StubModel(lambda block, step: None, 4), [[1, 2, 3]], gen_length=1,
                    block_length=4, ops="reference")
    assert flat.tokens == nested.tokens and len(flat.tokens) == 1


@pytest.mark.parametrize("ops", ["native", "reference"])
def test_an_undefined_softmax_stops_the_decode(ops):
    """A NaN logit (the model's fault) is an error naming the position, not a silent decode: the
    native step checks the softmax statistics' conf as the ops.logits_stats wrapper does."""
    model = StubModel(lambda block, step: None, 4)
    forward_cached = model.forward_cached

    def poisoned(*args, **kwargs):
        logits = forward_cached(*args, **kwargs)
        if logits is not None:
            logits[0, 2, 5] = math.nan
        return logits
    model.forward_cached = poisoned
    with pytest.raises(ValueError, match=r"logits\[0, 2\] has a NaN or \+inf logit"):
        decode(model, PROMPT, gen_length=4, block_length=4, ops=ops)
