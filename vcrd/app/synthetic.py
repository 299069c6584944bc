"""The built-in reasoning tasks: arithmetic word problems, solved step by step.

Three tasks share one :class:`Problem` type. ``events`` (:func:`make_problem`): a start amount, then
2–4 events (buying k packs of n, giving some away, sharing equally), 2-digit amounts; too hard for
a model trained for minutes on a CPU. ``two_step`` (:func:`make_two_step_problem`, what ``vcrd
demo`` uses): one "gets b more" and one "gives c away" in random order, with a ``difficulty`` knob
for the operand sizes; a 0.7M-parameter teacher learns it in a few minutes. ``totals``
(:func:`make_totals_problem`): the total of several people's amounts, whose intermediate steps are
under-specified (any order of the additions is right; the two reference styles of one problem add
in two different orders).

In the ``events`` task, each problem is a short story (a start amount, then 2–4 events: buying k packs of n, giving some
away, sharing equally among m people) whose answer needs one arithmetic step per event. Solutions
come in two teacher styles: ``terse`` (bare equations) and ``verbose`` (a sentence per step).
Steps are separated by blank lines, so SPEC §8's default splitter finds them, and every solution
ends with ``Answer: N``, which :func:`check_answer` reads.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana"]
ITEMS = ["apples", "marbles", "stamps", "coins", "cards", "pens"]
STYLES = ("terse", "verbose")


@dataclass
class Problem:
    """``question``; ``steps``: one ``(equation, sentence)`` pair per step; ``answer``;
    ``verbose_steps``: the verbose style's own steps when they differ from ``steps`` (another valid
    order of the same operations), else ``None``."""

    question: str
    steps: List[Tuple[str, str]]
    answer: int
    verbose_steps: Optional[List[Tuple[str, str]]] = None

    def solution(self, style: str = "terse") -> str:
        """The step-by-step solution in a teacher style; steps end with a blank line."""
        if style not in STYLES:
            raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
        if style == "terse":
            lines = [eq for eq, _ in self.steps]
        else:
            lines = [sentence for _, sentence in self.verbose_steps or self.steps]
        return "".join(f"{line}\n\n" for line in lines) + f"Answer: {self.answer}"


def make_problem(rng: random.Random, n_events: Optional[int] = None) -> Problem:
    """One random problem with ``n_events`` (default 2–4) events; all intermediate values are
    non-negative integers (sharing only happens when it divides evenly)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 40)
    story = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(n_events or rng.randint(2, 4)):
        kind = rng.choice(["buy", "give", "share"])
        if kind == "share":
            divisors = [m for m in range(2, 6) if total % m == 0 and total // m > 0]
            kind = "share" if divisors else "buy"
        if kind == "buy":
            k, n = rng.randint(2, 5), rng.randint(2, 9)
            story.append(f"{name} buys {k} packs of {n} {item}.")
            steps.append((f"{k}*{n}={k * n}", f"{k} packs of {n} make {k}*{n}={k * n} {item}."))
            steps.append((f"{total}+{k * n}={total + k * n}", f"So {name} has {total}+{k * n}={total + k * n} {item}."))
            total += k * n
        elif kind == "give" and total > 1:
            g = rng.randint(1, total - 1)
            story.append(f"{name} gives away {g} {item}.")
            left = f"{total}-{g}={total - g}"
            steps.append((left, f"After giving {g} away, {left} {item} are left."))
            total -= g
        else:
            m = rng.choice([m for m in range(2, 6) if total % m == 0] or [1])
            story.append(f"{name} shares them equally with {m - 1} friends and keeps one share.")
            steps.append((f"{total}/{m}={total // m}", f"Split {m} ways, each share is {total}/{m}={total // m}."))
            total //= m
    question = " ".join(story) + f" How many {item} does {name} have now?"
    return Problem(question, steps, total)


DIFFICULTIES = {0: (9, 9), 1: (19, 9), 2: (29, 19)}  # difficulty -> (max start, max amount got)
TASKS = ("events", "two_step", "totals")


def make_two_step_problem(rng: random.Random, difficulty: int = 0) -> Problem:
    """Two events (gets b more, gives c away) in random order; one arithmetic step per event.

    ``difficulty`` 0: start 1–9, b 1–9 (single-digit operands); 1: start 1–19, b 1–9; 2: start
    1–29, b 1–19. c is 0–9 and never more than there is, so every value is >= 0."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a_max, b_max = DIFFICULTIES[difficulty]
    total = start = rng.randint(1, a_max)
    story, steps = [], []
    order = ["buy", "give"] if rng.random() < 0.5 else ["give", "buy"]
    for kind in order:
        if kind == "buy":
            b = rng.randint(1, b_max)
            story.append(f"gets {b} more")
            steps.append((f"{total}+{b}={total + b}", f"{name} gets {b} more, so {total}+{b}={total + b}."))
            total += b
        else:
            c = rng.randint(0, min(total, 9))
            story.append(f"gives {c} away")
            steps.append((f"{total}-{c}={total - c}", f"{name} gives {c} away, so {total}-{c}={total - c} are left."))
            total -= c
    question = f"{name} has {start} {item}, {story[0]} and {story[1]}. How many now?"
    return Problem(question, steps, total)


TOTALS_DIFFICULTIES = {0: (3, 5), 1: (3, 9), 2: (4, 9)}  # difficulty -> (amounts, max amount)


def totals_steps(names: Sequence[str], amounts: Sequence[int], order: Sequence[int]) -> List[Tuple[str, str]]:
    """The additions of ``amounts`` in ``order`` (a permutation of their indices): running sums,
    one ``(equation, sentence)`` per addition."""
    first, second, *rest = order
    total = amounts[first] + amounts[second]
    steps = [(f"{amounts[first]}+{amounts[second]}={total}",
              f"{names[first]} and {names[second]} have {amounts[first]}+{amounts[second]}={total}, so far.")]
    for i in rest:
        eq = f"{total}+{amounts[i]}={total + amounts[i]}"
        steps.append((eq, f"With {names[i]}'s {amounts[i]}, so {eq}."))
        total += amounts[i]
    return steps


def make_totals_problem(rng: random.Random, difficulty: int = 0) -> Problem:
    """How many do 3–4 people have in all: the amounts added in any order, one addition per step.

    The terse and verbose reference solutions add in two different random orders (the verbose
    one never in the terse one's), so the same problem has several right solutions whose
    intermediate sums differ; the answer is fixed. ``difficulty`` 0: 3 amounts 1–5; 1: 3 amounts
    1–9; 2: 4 amounts 1–9."""
    if difficulty not in TOTALS_DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {sorted(TOTALS_DIFFICULTIES)}, got {difficulty!r}")
    n, top = TOTALS_DIFFICULTIES[difficulty]
    names, item = rng.sample(NAMES, n), rng.choice(ITEMS)
    amounts = [rng.randint(1, top) for _ in range(n)]
    terse = rng.sample(range(n), n)
    verbose = terse
    while verbose == terse:
        verbose = rng.sample(range(n), n)
    has = ", ".join(f"{who} has {a}" for who, a in zip(names[:-1], amounts[:-1]))
    question = f"{has} and {names[-1]} has {amounts[-1]} {item}. How many in all?"
    return Problem(question, totals_steps(names, amounts, terse), sum(amounts),
                   totals_steps(names, amounts, verbose))


def make_dataset(n: int, seed: int = 0, task: str = "events", difficulty: int = 0,
                 exclude: Iterable[str] = ()) -> List[Problem]:
    """``n`` problems of ``task`` (``"events"``, or ``"two_step"`` or ``"totals"`` at ``difficulty``) from one seed
    (the same arguments give the same problems); questions in ``exclude`` are skipped (held-out
    sets exclude the training questions; keep ``n`` well below the number of distinct questions,
    tens of thousands for the two-step task at difficulty 0)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    rng = random.Random(seed)
    skip = frozenset(exclude)
    out: List[Problem] = []
    while len(out) < n:
        if task == "events":
            p = make_problem(rng)
        else:
            p = (make_two_step_problem if task == "two_step" else make_totals_problem)(rng, difficulty)
        if p.question not in skip:
            out.append(p)
    return out


def check_answer(text: str, answer: int) -> bool:
    """True when the last ``Answer: N`` in ``text`` states ``answer``."""
    found = re.findall(r"Answer:\s*(-?\d+)", text)
    return bool(found) and int(found[-1]) == answer
