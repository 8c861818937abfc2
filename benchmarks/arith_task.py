"""The reproduction's checkable task: multi-step addition/subtraction with worked steps.

A problem is a start digit followed by 4 operations `+d` / `-d` (d in 1..9) whose running value
stays in [0, 19]; the answer shows every step, values written with two digits, and ends with
`#value`:

    prompt   "7+5-3+9-4"
    response "07+5=12;12-3=09;09+9=18;18-4=14;#14"

A fixed number of steps and fixed-width values put every token at a fixed position, so what is
hard is the arithmetic, not the layout (a model this small learns fixed-offset copying quickly,
content-addressed copying much more slowly): each step's value depends on the one before, and
decoding many tokens at once is genuinely risky. The trade-off between accuracy and tokens per
forward is what the benchmark measures. Problems come
from a seeded generator; the train and held-out sets are disjoint by construction.

The tokenizer is character level (a `tokenizers` WordLevel model over single characters plus a few
special tokens), saved as tokenizer.json + tokenizer_config.json with a chat template so that
transformers.AutoTokenizer loads it offline.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

MAX_VALUE = 19
N_STEPS = 4
SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = list("0123456789+-=;#")
EOS_TOKEN, MASK_TOKEN = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
# Ids of the special tokens: written into the model config by the benchmark.
EOS_ID, MASK_ID = 0, 1
VOCAB_SIZE = 32  # len(SPECIAL_TOKENS) + len(CHARS) = 20, rounded up

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def random_problem(rng: random.Random) -> str:
    """One problem statement, e.g. "7+5-3+9"."""
    while True:
        value = rng.randint(0, 9)
        text = str(value)
        for _ in range(N_STEPS):
            d = rng.randint(1, 9)
            op = rng.choice("+-")
            new = value + d if op == "+" else value - d
            if not 0 <= new <= MAX_VALUE:
                op, new = ("-", value - d) if op == "+" else ("+", value + d)
                if not 0 <= new <= MAX_VALUE:
                    break
            text += f"{op}{d}"
            value = new
        else:
            return text


def solve(problem: str) -> tuple[str, int]:
    """The worked answer and the final value of a problem."""
    value, i, steps = int(problem[0]), 1, []
    while i < len(problem):
        op, d = problem[i], int(problem[i + 1])
        new = value + d if op == "+" else value - d
        steps.append(f"{value:02d}{op}{d}={new:02d}")
        value, i = new, i + 2
    return ";".join(steps) + f";#{value:02d}", value


def final_answer(response: str) -> int | None:
    """The value after the first `#` of a generated response, None if there is none."""
    head, sep, tail = response.partition("#")
    digits = ""
    for ch in tail:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if sep and digits else None


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out problem lists (held-out problems are all distinct)."""
    rng = random.Random(seed)
    held_out: list[str] = []
    seen: set[str] = set()
    while len(held_out) < n_eval:
        p = random_problem(rng)
        if p not in seen:
            seen.add(p)
            held_out.append(p)
    train = []
    while len(train) < n_train:
        p = random_problem(rng)
        if p not in seen:
            train.append(p)
    return train, held_out


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def build_tokenizer(out_dir: Path) -> None:
    """Writes tokenizer.json + tokenizer_config.json (char level, with a chat template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    assert vocab[EOS_TOKEN] == EOS_ID and vocab[MASK_TOKEN] == MASK_ID and len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    # Text outside the task's alphabet (spaces, words, "?") is dropped rather than mapped to eos,
    # so a prompt like "What is 7+5-3+9-4?" reads as "7+5-3+9-4".
    tok.normalizer = normalizers.Replace(Regex(r"[^0-9+\-=;#]"), "")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN,
        "unk_token": EOS_TOKEN, "bos_token": None,
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
