"""The reproduction's task (benchmarks/arith_task.py): seeded splits, both answer styles, grading."""
import random

import pytest

from training_fixtures import arith_task as task


def _random_problems(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [task.random_problem(rng) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_written_solution_grades_correct_in_each_style(seed):
    for problem in _random_problems(200, seed):
        for style in task.STYLES:
            text, value = task.solve(problem, style)
            assert task.grade(problem, text), (problem, style, text)
            assert task.final_answer(text) == value
            assert 0 <= value <= task.MAX_VALUE


def test_styles_differ_but_have_the_same_width():
    for problem in _random_problems(100, 3):
        a, b = (task.solve(problem, s)[0] for s in task.STYLES)
        assert a != b and len(a) == len(b)


def test_steps_may_mix_styles_but_must_chain_and_end_right():
    problem = "7-5+3+2-4"
    assert task.solve(problem, "op_first")[0] == "7-5=2;2+3=5;5+2=7;7-4=3;#3"
    assert task.solve(problem, "result_first")[0] == "2=7-5;5=2+3;7=5+2;3=7-4;#3"
    assert task.grade(problem, "7-5=2;5=2+3;5+2=7;3=7-4;#3")  # per-step styles
    wrong = [
        "7-5=2;2+3=5;5+2=7;7-4=3;#4",    # final value
        "7-5=2;2+3=6;6+2=8;8-4=4;#4",    # a wrong step, consistent afterwards
        "7-5=2;2+3=5;5+2=7;#3",          # a step missing
        "7-5=2;2+3=5;5+2=7;7-4=3;#3;",   # trailing text
        "7-5=2;2=5+3;5+2=7;7-4=3;#3",    # halves of the two styles mixed in one step
        "7-5=02;2+3=5;5+2=7;7-4=3;#3",   # not the fixed-width form
        "",
    ]
    for text in wrong:
        assert not task.grade(problem, text), text
    assert task.final_answer(wrong[1]) == 4 and task.final_answer("no answer") is None


def test_training_records_are_seeded_and_use_both_styles():
    train, held_out = task.make_splits(400, 50, seed=5)
    assert not set(train) & set(held_out) and len(set(held_out)) == 50
    records = task.training_records(train, seed=5)
    assert records == task.training_records(train, seed=5)
    assert records != task.training_records(train, seed=6)
    counts = {s: sum(r["response"] == task.solve(r["prompt"], s)[0] for r in records)
              for s in task.STYLES}
    assert sum(counts.values()) == len(records)
    for style, weight in zip(task.STYLES, task.STYLE_WEIGHTS):  # within sampling noise
        assert abs(counts[style] / len(records) - weight) < 0.1, counts
    with pytest.raises(ValueError, match="style"):
        task.solve("7+5", "words")
