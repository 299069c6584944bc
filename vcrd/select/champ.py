"""CHAMP (``champ-dataset``, MIT): competition problems with the recorded responses of four real teachers,
for LALP on real data (``vcrd bench-real lalp``, docs/real.md).

``champ_dataset/dataset_files/v0.json`` → ``problems`` (270), each with ``_text``, ``_answer`` and
``conversations`` keyed ``"<teacher>|<variant>"``; a conversation's ``messages`` are a system message, the
user's prompt, the teacher's solution, a request to summarise and the teacher's one-sentence final answer.

Grading is numeric only: a problem is gradable when its ``_answer`` is a number (``239``, ``-3``, ``0.5``,
``5/14``, ``sqrt`` excluded) or names one after ``or equivalently`` (``C(10, 5), or equivalently 252``);
answers that are formulas in ``n``, ``Yes``/``No`` or intervals are left out (:func:`answer_value` gives
``None``). A response's final answer is read from its summary sentence by :func:`final_value`.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

TEACHERS = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
REQUIREMENT = "champ-dataset==1.0.0"

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_FRAC = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}")
_TOKEN = re.compile(rf"(?<![\w.^\u221a])({_NUMBER})(?:\s*/\s*({_NUMBER}))?(%)?(?![\w^\u221a])")
_SCRIPT = re.compile(r"[\^_](?:\{[^{}]*\}|-?\w+)")  # exponents and subscripts: 2^{32}, a_{1964}, x^2
_VERB = re.compile(r"\b(?:is|are|equals|be)\b")


def champ_file() -> Path:
    """``v0.json`` of the installed ``champ_dataset`` package (located with ``find_spec``, not imported);
    ``FileNotFoundError`` saying what to install when it is absent."""
    spec = importlib.util.find_spec("champ_dataset")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / "dataset_files" / "v0.json" if folders else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"CHAMP: the package {REQUIREMENT} is not installed (make real, or: "
                                f"pip install --no-deps {REQUIREMENT})")
    return path


def _number(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answer_value(answer: str) -> Optional[Fraction]:
    """The number a CHAMP ``_answer`` states, or ``None`` when it is not a plain number (a formula, Yes/No,
    an interval). ``"X, or equivalently N"`` gives ``N``; ``"5/14, or approximately 35.7%"`` gives 5/14."""
    text = answer.strip()
    if ", or equivalently " in text:
        text = text.split(", or equivalently ", 1)[1].strip()
    text = re.split(r",? or approximately |\s*\(i\.e\.", text)[0].strip()
    m = re.fullmatch(rf"({_NUMBER})(?:\s*/\s*({_NUMBER}))?", text)
    if not m:
        return None
    value = _number(m.group(1))
    if value is not None and m.group(2):
        den = _number(m.group(2))
        value = value / den if den else None
    return value


def numbers_in(text: str) -> List[Fraction]:
    """The numbers of ``text`` in order: integers, decimals, thousands with commas, ``a/b`` and
    ``\\frac{a}{b}`` as one fraction each, ``N%`` as N/100; a number glued to a letter, ``^``, ``√`` or a
    backslash (``x2``, ``2^n``, ``2√3``, ``2\\sqrt{3}``) is skipped."""
    text = _FRAC.sub(lambda m: f" {m.group(1)}/{m.group(2)} ", text)
    out = []
    for m in _TOKEN.finditer(text):
        value = _number(m.group(1))
        if value is not None and m.group(2):
            den = _number(m.group(2))
            value = value / den if den else None
        if value is not None:
            out.append(value / 100 if m.group(3) else value)
    return out


def same_value(got: Fraction, want: Fraction) -> bool:
    """Equal, or within 0.1 % for a non-integer answer stated in decimals (5/14 vs "35.7143%")."""
    return got == want or (want.denominator != 1 and abs(got - want) <= Fraction(1, 1000) * max(1, abs(want)))


def final_value(summary: str, problem: str) -> Optional[Fraction]:
    """A response's final answer from its one-sentence summary, exponents and subscripts removed
    (``2^{32}``, ``a_{1964}``): the first number after the last "is"/"are"/"equals"/"be" ("There are 29
    strings of length 6" → 29; "is 2, which occurs at x = 0" → 2); without one, the first number the
    problem statement does not contain, else the last number; ``None`` when it has no number."""
    summary = _SCRIPT.sub(" ", summary)
    verbs = list(_VERB.finditer(summary))
    if verbs:
        after = numbers_in(summary[verbs[-1].end():])
        if after:
            return after[0]
    found = numbers_in(summary)
    if not found:
        return None
    given = set(numbers_in(problem))
    fresh = [v for v in found if v not in given]
    return fresh[0] if fresh else found[-1]


@dataclass
class ChampResponse:
    teacher: str
    messages: List[Dict[str, str]]  # the chat before the solution: system, user (roles in lower case)
    solution: str
    summary: str
    value: Optional[Fraction] = None  # the parsed final answer (None: could not be parsed)
    correct: Optional[bool] = None  # None when not parsed


@dataclass
class ChampProblem:
    identifier: str
    category: str
    text: str
    answer: str
    value: Fraction
    responses: List[ChampResponse] = field(default_factory=list)


def load_champ(n_problems: int, *, variant: str = "0-Shot", teachers: Sequence[str] = TEACHERS, seed: int = 0,
               path: Union[None, str, Path] = None) -> List[ChampProblem]:
    """``n_problems`` gradable CHAMP problems (numeric answer, a response of every teacher under ``variant``),
    drawn at random with ``seed`` from all such problems (then in identifier order), with each teacher's
    response graded. ``ValueError`` for a bad ``n_problems`` or an unknown teacher or variant."""
    if isinstance(n_problems, bool) or not isinstance(n_problems, int) or n_problems < 1:
        raise ValueError(f"n_problems: expected an int >= 1, got {n_problems!r}")
    unknown = [t for t in teachers if t not in TEACHERS]
    if unknown or not teachers:
        raise ValueError(f"teachers: expected a non-empty subset of {list(TEACHERS)}, got {list(teachers)}")
    problems = json.loads(Path(path or champ_file()).read_text(encoding="utf-8"))["problems"]
    variants = {key.split("|", 1)[1] for p in problems.values() for key in p["conversations"]}
    if variant not in variants:
        raise ValueError(f"variant: expected one of {sorted(variants)}, got {variant!r}")
    gradable = [k for k in sorted(problems) if answer_value(problems[k]["_answer"]) is not None
                and all(f"{t}|{variant}" in problems[k]["conversations"] for t in teachers)]
    if n_problems > len(gradable):
        raise ValueError(f"n_problems: expected at most {len(gradable)} (gradable problems with every teacher "
                         f"under {variant!r}), got {n_problems}")
    chosen = sorted(random.Random(seed).sample(gradable, n_problems))
    out = []
    for key in chosen:
        p = problems[key]
        problem = ChampProblem(key, p.get("category", ""), p["_text"], p["_answer"], answer_value(p["_answer"]))
        for t in teachers:
            messages = p["conversations"][f"{t}|{variant}"]["messages"]
            model = [m["text"] or "" for m in messages if m["role"].startswith("Model")]
            first = next(i for i, m in enumerate(messages) if m["role"].startswith("Model"))
            chat = [{"role": m["role"].lower(), "content": m["text"] or ""} for m in messages[:first]]
            r = ChampResponse(t, chat, model[0], model[-1] if len(model) > 1 else "")
            # an empty summary (a few recorded errors): the solution's last paragraph instead
            last = r.summary.strip() or r.solution.strip().split("\n\n")[-1]
            r.value = final_value(last, problem.text)
            r.correct = None if r.value is None else same_value(r.value, problem.value)
            problem.responses.append(r)
        out.append(problem)
    return out


def gradable_count(variant: str = "0-Shot", teachers: Sequence[str] = TEACHERS,
                   path: Union[None, str, Path] = None) -> int:
    """How many problems :func:`load_champ` can draw from (numeric answer, every teacher under ``variant``)."""
    problems = json.loads(Path(path or champ_file()).read_text(encoding="utf-8"))["problems"]
    return sum(1 for p in problems.values() if answer_value(p["_answer"]) is not None
               and all(f"{t}|{variant}" in p["conversations"] for t in teachers))


def accuracy_by_teacher(problems: Sequence[ChampProblem]) -> Dict[str, Dict[str, int]]:
    """Per teacher: ``right``, ``wrong`` and ``unparsed`` final answers over ``problems``."""
    out: Dict[str, Dict[str, int]] = {}
    for p in problems:
        for r in p.responses:
            row = out.setdefault(r.teacher, {"right": 0, "wrong": 0, "unparsed": 0})
            row["unparsed" if r.correct is None else "right" if r.correct else "wrong"] += 1
    return out
