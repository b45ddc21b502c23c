"""Answer extraction and comparison for the evaluation tasks: small pure functions on strings.

Nothing here runs model output; HumanEval code is executed only by :mod:`edge_ensemble.eval.sandbox`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# The extractors live with the package core, where the vote policy reads answers the same way; the tasks and
# their tests keep reading them here.
from edge_ensemble.answers import (  # noqa: F401 (re-exported)
    extract_boxed,
    extract_choice_letter,
    extract_gsm8k_answer,
    extract_last_number,
    extract_math_answer,
    normalize_math_answer,
    normalize_number,
)

# ---------------------------------------------------------------- numbers (GSM8K)


def gsm8k_gold(answer: str) -> str:
    """Gold number of a GSM8K solution (the text after "####"), canonicalised."""
    tail = answer.rsplit("####", 1)[-1]
    value = normalize_number(tail)
    if value is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer[-60:]!r}")
    return value


def numbers_equal(pred: str | None, gold: str) -> bool:
    """True when ``pred`` and ``gold`` are the same number (exact decimal comparison)."""
    if pred is None:
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    return a is not None and a == b


# ---------------------------------------------------------------- MATH answers


def _to_number(s: str) -> Fraction | None:
    """Value of a normalised integer, decimal, ``\\frac{a}{b}`` or ``a/b``; None otherwise."""
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    try:
        if re.fullmatch(r"\d+(?:\.\d+)?|\.\d+", s):
            return sign * Fraction(s)
        m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}|(-?\d+)/(-?\d+)", s)
        if m is not None:
            num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
            return sign * Fraction(num) / Fraction(den)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside braces, parentheses or brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _normalized_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return x == y or math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
    if a.isalpha() and b.isalpha() and len(a) > 1:
        return a.lower() == b.lower()
    # Tuples and intervals: same brackets, element by element.
    if len(a) > 2 and len(b) > 2 and a[0] == b[0] and a[-1] == b[-1] and a[0] in "([" and a[-1] in ")]":
        xs, ys = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        if len(xs) == len(ys) > 1:
            return all(_normalized_equal(p, q) for p, q in zip(xs, ys))
        return False
    # Bare lists of solutions ("1,-2"): same elements in any order.
    xs, ys = _split_top_level(a), _split_top_level(b)
    if len(xs) == len(ys) > 1:
        remaining = list(ys)
        for p in xs:
            hit = next((q for q in remaining if _normalized_equal(p, q)), None)
            if hit is None:
                return False
            remaining.remove(hit)
        return True
    return False


def math_equal(pred: str | None, gold: str) -> bool:
    """True when two MATH answers agree: equal after normalising, or equal as numbers (0.5 == \\frac{1}{2})."""
    if pred is None:
        return False
    return _normalized_equal(normalize_math_answer(pred), normalize_math_answer(gold))


# ---------------------------------------------------------------- HumanEval completions

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code_completion(text: str, entry_point: str) -> str:
    """What to append to a HumanEval prompt: the model's code from a ```python fence (or the raw text).

    A full ``def entry_point(...)`` is appended after the prompt, redefining the stub; a bare body is
    indented to sit under the prompt's signature.
    """
    text = text or ""
    blocks = _FENCE_RE.findall(text)
    defines = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    if blocks:
        code = next((b for b in blocks if defines.search(b)), blocks[0])
    else:
        code = text
    code = code.rstrip() + "\n"
    if defines.search(code):
        return "\n" + code
    lines = code.split("\n")
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        code = "\n".join("    " + line if line.strip() else line for line in lines)
    return code


# ---------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z=1.96); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def sign_test_fewer(only_first: int, only_second: int) -> float:
    """One-sided exact sign test on paired outcomes: the chance of ``only_first`` or fewer wins in
    ``only_first + only_second`` fair coin tosses, i.e. how surprising it would be that the first configuration
    is this far behind the second if the two were equally good."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be non-negative, got {only_first} and {only_second}")
    n = only_first + only_second
    return sum(math.comb(n, i) for i in range(only_first + 1)) / 2**n


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value for paired right/wrong outcomes.

    ``only_first`` counts items the first configuration got right and the second wrong, ``only_second`` the
    reverse; items both got right (or both wrong) carry no information about which is better. Under the null
    hypothesis the discordant items split like a fair coin, so this is a two-sided binomial test.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be non-negative, got {only_first} and {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**n)
