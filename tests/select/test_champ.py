"""CHAMP answer parsing (vcrd.select.champ) on sentences written here; the loader on the installed package
when it is there."""

from __future__ import annotations

from fractions import Fraction as F

import pytest

from vcrd.select.champ import answer_value, final_value, numbers_in, same_value


@pytest.mark.parametrize("answer,value", [
    ("239", F(239)), ("-3", F(-3)), ("0.5", F(1, 2)), ("5/14, or approximately 35.7%", F(5, 14)),
    ("C(10, 5), or equivalently 252", F(252)), ("100 (i.e., all values)", F(100)), ("2^(n-1)", None), ("No", None),
    ("[-1, 1]", None), ("sqrt(3)/3, or equivalently 1/sqrt(3)", None)])
def test_answer_value(answer, value):
    assert answer_value(answer) == value


def test_numbers_in():
    assert numbers_in(r"is $\frac{1}{8}$, 1,366 ways, 35.7143% and 5 / 14; x2, 2^n and 2√3 are not numbers") == \
        [F(1, 8), F(1366), F(357143, 1000000), F(5, 14)]


@pytest.mark.parametrize("summary,problem,value", [
    ("There are 29 valid strings of length 6 with digits differing by at most 1.", "strings of length 6 ... 1", F(29)),
    ("The smallest value of (x^2 + 2) / sqrt(x^2 + 1) for real x is 2, which occurs at x = 0.", "(x^2+2)/sqrt(x^2+1)",
     F(2)),
    (r"The value of \( a_{1964} \) modulo 4 is 2.", "a_1964 mod 4", F(2)),
    (r"The remainder when \(2^{32} + 1\) is divided by 641 is 0.", "2^32+1 by 641", F(0)),
    ("All 100 values in the sequence a_1, ..., a_100 are integers.", "the first 100 numbers", F(100)),
    ("The number of such pairs: 7 with 3 left over", "pairs of 3", F(7)),
    ("No number here.", "x", None),
])
def test_final_value(summary, problem, value):
    assert final_value(summary, problem) == value


def test_same_value_tolerates_rounded_decimals_only():
    assert same_value(F(357143, 1000000), F(5, 14)) and not same_value(F(36, 100), F(5, 14))
    assert not same_value(F(240), F(239)) and same_value(F(239), F(239))


def test_loader_on_the_installed_package():
    import importlib.util

    if importlib.util.find_spec("champ_dataset") is None:
        pytest.skip("champ-dataset (make real) is not installed")
    from vcrd.select.champ import TEACHERS, load_champ

    problems = load_champ(5, seed=1)
    assert len(problems) == 5 and all([r.teacher for r in p.responses] == list(TEACHERS) for p in problems)
    r = problems[0].responses[0]
    assert [m["role"] for m in r.messages] == ["system", "user"] and problems[0].text in r.messages[1]["content"]
    with pytest.raises(ValueError, match="teachers: expected a non-empty subset"):
        load_champ(2, teachers=["GPT-5"])
    with pytest.raises(ValueError, match="variant: expected one of"):
        load_champ(2, variant="7-Shot")
    with pytest.raises(ValueError, match="n_problems: expected at most"):
        load_champ(10_000)
