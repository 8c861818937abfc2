"""Training data: jsonl records -> fixed-length token sequences with prompt/response boundaries.

A record is either {"prompt": str, "response": str} or a chat {"messages": [{"role", "content"},
...]} whose last message is the assistant's answer (the response); every earlier message is the
prompt. The prompt is rendered with the tokenizer's chat template (with the generation prompt),
the response is its content tokens followed by one eos: the end-of-answer token the decoder stops
on. Sequences are padded with eos to the fixed length L; a record that does not fit is dropped
(and counted), never truncated, because a cut answer would teach the model to stop mid-answer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
    return records


def prompt_messages(record: dict) -> list[dict]:
    """The chat messages that form the prompt of a record (its answer, if any, left out)."""
    if "messages" in record:
        messages = list(record["messages"])
        return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
    return [{"role": "user", "content": record["prompt"]}]


def split_record(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, response text) of a {"prompt","response"} or {"messages"} record."""
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat record's last message must be the assistant's answer, "
                             f"got {messages[-1:] if messages else 'no messages'}")
        return prompt_messages(record), messages[-1]["content"]
    if "prompt" not in record or "response" not in record:
        raise ValueError(f"a record needs 'prompt' and 'response' or 'messages', got keys {sorted(record)}")
    return prompt_messages(record), record["response"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids through the chat template (plain text when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class TokenizedData:
    """N fixed-length sequences: ids [N, L] (eos padded); prompt_len [N]: the response starts
    there; response_end [N]: one past the response's eos."""
    ids: torch.Tensor
    prompt_len: torch.Tensor
    response_end: torch.Tensor
    n_dropped: int
    fingerprint: str

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]


def tokenize_records(records: list[dict], tokenizer, seq_len: int, eos_id: int) -> TokenizedData:
    rows, prompt_lens, ends, dropped = [], [], [], 0
    for record in records:
        messages, response = split_record(record)
        prompt = encode_prompt(tokenizer, messages)
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
        if len(prompt) + len(answer) > seq_len:
            dropped += 1
            continue
        ids = prompt + answer
        rows.append(ids + [eos_id] * (seq_len - len(ids)))
        prompt_lens.append(len(prompt))
        ends.append(len(ids))
    if not rows:
        raise ValueError(f"no record fits seq_len={seq_len} ({dropped} dropped)")
    ids = torch.tensor(rows, dtype=torch.int64)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return TokenizedData(ids, torch.tensor(prompt_lens), torch.tensor(ends), dropped, digest)


def load_training_data(path: str | Path, tokenizer, seq_len: int, eos_id: int) -> TokenizedData:
    return tokenize_records(read_jsonl(path), tokenizer, seq_len, eos_id)
