"""Training data: records -> fixed-length ids with prompt/response boundaries."""
import json

import pytest
from training_fixtures import EOS, arith_tokenizer

from dmax_ext.training.data import load_training_data, tokenize_records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return arith_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_response_boundaries_and_padding(tok):
    data = tokenize_records([{"prompt": "7+5", "response": "7+5=12;#12"}], tok, 24, EOS)
    prompt = tok("<|user|>7+5<|assistant|>", add_special_tokens=False)["input_ids"]
    answer = tok("7+5=12;#12", add_special_tokens=False)["input_ids"]
    assert data.prompt_len.tolist() == [len(prompt)]
    assert data.response_end.tolist() == [len(prompt) + len(answer) + 1]
    assert data.ids[0].tolist() == prompt + answer + [EOS] * (24 - len(prompt) - len(answer))


def test_chat_records_match_prompt_records(tok):
    plain = tokenize_records([{"prompt": "3-1", "response": "3-1=2;#2"}], tok, 20, EOS)
    chat = tokenize_records([{"messages": [{"role": "user", "content": "3-1"},
                                           {"role": "assistant", "content": "3-1=2;#2"}]}],
                            tok, 20, EOS)
    assert plain.ids.tolist() == chat.ids.tolist()
    assert plain.prompt_len.tolist() == chat.prompt_len.tolist()
    assert plain.fingerprint == chat.fingerprint


def test_multi_turn_prompt_is_everything_before_the_last_answer(tok):
    record = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                           {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}
    data = tokenize_records([record], tok, 32, EOS)
    text = "<|user|>1+1<|assistant|>2<|user|>2+2<|assistant|>"
    assert data.prompt_len.item() == len(tok(text, add_special_tokens=False)["input_ids"])


def test_too_long_records_are_dropped_and_counted(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1+2", "response": "1+2=3;#3"}, {"prompt": "1+2", "response": "9" * 40}]) + "\n")
    data = load_training_data(path, tok, 20, EOS)
    assert len(data) == 1 and data.n_dropped == 1 and data.seq_len == 20


def test_bad_records_are_named(tmp_path, tok):
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        tokenize_records([{"prompt": "x"}], tok, 16, EOS)
    with pytest.raises(ValueError, match="last message must be the assistant"):
        tokenize_records([{"messages": [{"role": "user", "content": "1"}]}], tok, 16, EOS)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1", "response": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_training_data(path, tok, 16, EOS)
