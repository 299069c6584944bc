"""The built-in reasoning task: problems are consistent, solutions check, styles split into steps."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from vcrd.app.synthetic import check_answer, make_dataset, make_problem
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.select.naturalness import split_steps


def test_solutions_are_right_and_steps_evaluate():
    for p in make_dataset(200, seed=3):
        for style in ("terse", "verbose"):
            assert check_answer(p.solution(style), p.answer)
        for eq, _ in p.steps:  # every equation is true
            lhs, rhs = eq.split("=")
            assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 (our own generated arithmetic)
        assert int(p.steps[-1][0].split("=")[1]) == p.answer


def test_same_seed_same_data_and_styles_split_into_steps():
    assert [p.question for p in make_dataset(5, seed=1)] == [p.question for p in make_dataset(5, seed=1)]
    tok = build_char_tokenizer()
    p = make_problem(random.Random(0), n_events=3)
    for style in ("terse", "verbose"):
        steps = split_steps(p.solution(style), tok)
        assert len(steps) == len(p.steps) + 1 and steps[-1].startswith("Answer:")
        assert all(tok.unk_token_id not in tok(s, add_special_tokens=False)["input_ids"] for s in steps)


def test_answer_checker_and_bad_style():
    assert check_answer("x\n\nAnswer: 12", 12) and not check_answer("Answer: 12\n\nAnswer: 13", 12)
    assert not check_answer("no answer here", 1)
    with pytest.raises(ValueError, match="style"):
        make_problem(random.Random(0)).solution("chatty")


def test_two_step_task_difficulty_and_held_out_exclusion():
    train = make_dataset(300, seed=0, task="two_step", difficulty=0)
    held = make_dataset(100, seed=1, task="two_step", difficulty=0, exclude={p.question for p in train})
    assert not {p.question for p in held} & {p.question for p in train}
    for p in train + held:
        assert len(p.steps) == 2
        for style in ("terse", "verbose"):
            assert check_answer(p.solution(style), p.answer)
        for eq, _ in p.steps:
            lhs, rhs = eq.split("=")
            assert eval(lhs) == int(rhs) >= 0  # noqa: S307 (our own generated arithmetic)
    assert max(int(p.steps[0][0].split("+")[0].split("-")[0]) for p in train) <= 9
    hard = make_dataset(200, seed=0, task="two_step", difficulty=2)
    assert max(int(p.steps[0][0].split("+")[0].split("-")[0]) for p in hard) > 9
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset(1, task="two_step", difficulty=7)
    with pytest.raises(ValueError, match="task"):
        make_dataset(1, task="riddles")


def _terms(p, style):
    """The amounts a solution adds, in its order, and its intermediate sums (its steps' arithmetic checked)."""
    terms, sums = [], []
    for line in p.solution(style).split("\n\n")[:-1]:
        lhs, rhs = re.search(r"(\d+\+\d+)=(\d+)", line).groups()
        a, b = map(int, lhs.split("+"))
        assert a + b == int(rhs)  # the step's arithmetic
        if sums:
            assert a == sums[-1]  # a running sum: each step starts from the previous result
            terms.append(b)
        else:
            terms += [a, b]
        sums.append(int(rhs))
    return terms, sums


def test_totals_task_steps_add_the_question_amounts_in_different_orders():
    problems = make_dataset(600, seed=5, task="totals")
    orders = set()
    for p in problems:
        amounts = [int(x) for x in re.findall(r"\d+", p.question)]
        assert len(amounts) == 3 and all(1 <= a <= 5 for a in amounts) and p.answer == sum(amounts)
        terse, verbose = _terms(p, "terse"), _terms(p, "verbose")
        for terms, sums in (terse, verbose):
            assert sorted(terms) == sorted(amounts) and sums[-1] == p.answer and len(sums) == 2
        assert terse[0] != verbose[0] or len(set(amounts)) < 3  # two different orders of the same additions
        if len(set(amounts)) == 3:
            orders.add(tuple(amounts.index(t) for t in terse[0]))
        for style in ("terse", "verbose"):
            assert check_answer(p.solution(style), p.answer) and not check_answer(p.solution(style), p.answer + 1)
    assert orders == set(itertools.permutations(range(3)))  # every order of the additions occurs
    differ = sum(_terms(p, "terse")[1][0] != _terms(p, "verbose")[1][0] for p in problems)
    assert differ > len(problems) // 2  # the first intermediate sum usually differs between the two solutions


def test_totals_task_difficulty_and_steps():
    for difficulty, n, top in ((1, 3, 9), (2, 4, 9)):
        amounts = [list(map(int, re.findall(r"\d+", p.question)))
                   for p in make_dataset(100, seed=0, task="totals", difficulty=difficulty)]
        assert {len(a) for a in amounts} == {n} and max(max(a) for a in amounts) == top
    tok = build_char_tokenizer()
    p = make_dataset(1, seed=0, task="totals")[0]
    for style in ("terse", "verbose"):
        steps = split_steps(p.solution(style), tok)
        assert len(steps) == 3 and steps[-1] == f"Answer: {p.answer}"
        assert all(tok.unk_token_id not in tok(s, add_special_tokens=False)["input_ids"] for s in steps)
    with pytest.raises(ValueError, match="difficulty"):
        make_dataset(1, task="totals", difficulty=3)
