"""Self-distillation: the model answers the training prompts itself; its answers become OPUT data.

DMax fine-tunes on the base model's own generations, so training inputs match what the model
produces at decoding time. Answers that did not finish (no eos within gen_length, or a mask id
left by the step cap) are dropped and counted: an unfinished answer would teach the model to
stop mid-answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import encode_prompt, prompt_messages


def distill_records(model, tokenizer, records: list[dict], *, gen_length: int, block_length: int,
                    threshold: float, mode: str = "threshold", batch_size: int = 32,
                    progress: bool = True, **decode_kwargs) -> tuple[list[dict], dict]:
    """(training records, counts). A {"prompt"} record becomes {"prompt", "response"}; a
    {"messages"} record gets the answer appended as an assistant message."""
    from ..decoding import decode

    eos_id, mask_id = model.config.eos_token_id, model.config.mask_token_id
    out, counts = [], {"prompts": len(records), "kept": 0, "no_eos": 0, "masked": 0,
                       "tokens": 0, "nfe": 0}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc="distill", dynamic_ncols=True)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, prompt_messages(r)) for r in chunk]
        result = decode(model, prompts, gen_length=gen_length, block_length=block_length,
                        threshold=threshold, mode=mode, **decode_kwargs)
        counts["nfe"] += result.nfe
        for record, tokens in zip(chunk, result.tokens):
            counts["tokens"] += len(tokens)
            if not tokens or tokens[-1] != eos_id:
                counts["no_eos"] += 1
                continue
            if mask_id in tokens:
                counts["masked"] += 1
                continue
            text = tokenizer.decode(tokens[:-1], skip_special_tokens=False)
            out.append(_with_answer(record, text))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    counts["kept"] = len(out)
    return out, counts


def _with_answer(record: dict, text: str) -> dict:
    if "messages" in record:
        return {"messages": prompt_messages(record) + [{"role": "assistant", "content": text}]}
    return {"prompt": record["prompt"], "response": text}


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
