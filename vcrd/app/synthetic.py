"""The built-in reasoning task: multi-step arithmetic word problems, solved step by step.

Each problem is a short story (a start amount, then 2–4 events: buying k packs of n, giving some
away, sharing equally among m people) whose answer needs one arithmetic step per event. Solutions
come in two teacher styles: ``terse`` (bare equations) and ``verbose`` (a sentence per step).
Steps are separated by blank lines, so SPEC §8's default splitter finds them, and every solution
ends with ``Answer: N``, which :func:`check_answer` reads.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana"]
ITEMS = ["apples", "marbles", "stamps", "coins", "cards", "pens"]
STYLES = ("terse", "verbose")


@dataclass
class Problem:
    """``question``; ``steps``: one ``(equation, sentence)`` pair per step; ``answer``."""

    question: str
    steps: List[Tuple[str, str]]
    answer: int

    def solution(self, style: str = "terse") -> str:
        """The step-by-step solution in a teacher style; steps end with a blank line."""
        if style not in STYLES:
            raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
        lines = [eq if style == "terse" else sentence for eq, sentence in self.steps]
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


def make_dataset(n: int, seed: int = 0) -> List[Problem]:
    """``n`` problems from one seed (the same seed gives the same problems)."""
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def check_answer(text: str, answer: int) -> bool:
    """True when the last ``Answer: N`` in ``text`` states ``answer``."""
    found = re.findall(r"Answer:\s*(-?\d+)", text)
    return bool(found) and int(found[-1]) == answer
