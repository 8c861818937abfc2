"""The reproduction's checkable task: multi-step addition/subtraction with worked steps.

A problem is a start digit followed by 4 operations `+d` / `-d` (d in 1..9) whose running value
stays in [0, 9]; the answer shows every step and ends with `#value`. A step can be written two equivalent ways, operation first or result first, and the
training answers use either (one style per answer, chosen by the seeded generator: a house style
in three answers of four, the other in the rest):

    prompt    "7-5+3+2-4"
    response  "7-5=2;2+3=5;5+2=7;7-4=3;#3"     (operation first)
          or  "2=7-5;5=2+3;7=5+2;3=7-4;#3"     (result first)

Why two styles: real answers are multimodal (the same solution can be phrased several ways), and
that is what makes hard parallel decoding collapse: positions decoded independently in one
forward mix the modes (half a step in one style, half in the other), while decoding a few tokens
per forward commits one style and follows it. Self-distillation (the DMax data recipe) gives the
fine-tuned model answers in the styles its base model picked, and OPUT teaches it to repair its
own mixed first guesses. Both styles have the same width, so every token sits at a fixed position
(a model this small learns fixed-offset copying quickly, content-addressed copying much more
slowly); each step's value depends on the one before.

Grading (`grade`): a response is correct when it is a valid worked solution: every step a true
equation continuing from the previous value, in either style (styles may even differ between
steps), then the right `#value`. The final value alone is reported too (`final_answer`).

Problems come from a seeded generator; the train and held-out sets are disjoint by construction.
The tokenizer is character level (a `tokenizers` WordLevel model over single characters plus a few
special tokens), saved as tokenizer.json + tokenizer_config.json with a chat template so that
transformers.AutoTokenizer loads it offline.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

MAX_VALUE = 9
WIDTH = len(str(MAX_VALUE))  # every value is written with this many digits (zero-padded)
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


STYLES = ("op_first", "result_first")
# How often the training answers use each style: a corpus with a prevailing convention and
# exceptions. Even split (tried: docs/TRADEOFF.md) leaves the base model's own choice of style
# close to a coin flip per prompt, so its self-distilled answers stay multimodal.
STYLE_WEIGHTS = (0.75, 0.25)


def _step(value: int, op: str, d: int, new: int, style: str) -> str:
    if style == "op_first":
        return f"{value:0{WIDTH}d}{op}{d}={new:0{WIDTH}d}"
    if style == "result_first":
        return f"{new:0{WIDTH}d}={value:0{WIDTH}d}{op}{d}"
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _chain(problem: str) -> list[tuple[int, str, int, int]]:
    """(value before, op, digit, value after) of each step."""
    value, i, steps = int(problem[0]), 1, []
    while i < len(problem):
        op, d = problem[i], int(problem[i + 1])
        new = value + d if op == "+" else value - d
        steps.append((value, op, d, new))
        value, i = new, i + 2
    return steps


def solve(problem: str, style: str = "op_first") -> tuple[str, int]:
    """The worked answer in one style and the final value of a problem."""
    steps = _chain(problem)
    final = steps[-1][3] if steps else int(problem[0])
    return ";".join(_step(*s, style) for s in steps) + f";#{final:0{WIDTH}d}", final


def grade(problem: str, response: str) -> bool:
    """True if `response` is a valid worked solution of `problem` (each step in either style)."""
    steps = _chain(problem)
    parts = response.split(";")
    if len(parts) != len(steps) + 1:
        return False
    for part, step in zip(parts, steps):
        if part not in {_step(*step, style) for style in STYLES}:
            return False
    return parts[-1] == f"#{steps[-1][3]:0{WIDTH}d}"


def training_records(problems: list[str], seed: int) -> list[dict]:
    """{"prompt", "response"} records, each answer in a style drawn from a seeded generator."""
    rng = random.Random(f"styles-{seed}")
    styles = rng.choices(STYLES, weights=STYLE_WEIGHTS, k=len(problems))
    return [{"prompt": p, "response": solve(p, style)[0]} for p, style in zip(problems, styles)]


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
    # so a prompt like "What is 7-5+3+2-4?" reads as "7-5+3+2-4".
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
