"""Reading the final answer out of a model's text: small pure functions on strings, stdlib only.

The evaluation tasks score with them (:mod:`edge_ensemble.eval.scoring` re-exports them) and the ``vote`` policy
compares samples by them (:mod:`edge_ensemble.voting`), so a vote and its score read an answer the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

# ---------------------------------------------------------------- numbers (GSM8K)

# A number as written in prose: optional sign and currency, thousands groups, decimals.
# The look-behind keeps "3-7" from reading as "-7" and "1.5.2" from yielding ".2".
_NUMBER_RE = re.compile(
    r"(?<![\d.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
)
_ANSWER_PHRASE_RE = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical decimal string for a number such as "1,234", "$1,234.50", "-7", "18.00", "42." (None if not one)."""
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace("%", "").strip()
    s = s.rstrip(".")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, as written (commas and "$" kept); None if there is none."""
    matches = _NUMBER_RE.findall(text or "")
    return matches[-1] if matches else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The model's final number: the last number on the line after the last "answer is", else the last number.

    Preferring the "answer is" line keeps a trailing remark ("Note: 3 of the eggs...") from winning.
    """
    text = text or ""
    phrases = list(_ANSWER_PHRASE_RE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end():].lstrip()
        line = rest.split("\n", 1)[0]
        number = extract_last_number(line)
        if number is not None:
            return number
    return extract_last_number(text)


# ---------------------------------------------------------------- multiple choice (ARC)

_LETTERS = "ABCDEFGHIJ"
# "The answer is (B)", "Answer: B", "the correct choice is C", "answer would be: **D**".
_CUE_RE = re.compile(
    r"\b(?:answer|choice|option)\b"
    r"(?:\s*(?:is|would\s+be|should\s+be|must\s+be|will\s+be)\s*:?|\s*[:=])"
    r"\s*(?:(?:option|choice|letter)\s+)?"
    r"(?P<open>\*\*|[\(\[])?\s*(?P<tok>[A-Za-z0-9])\s*(?P<close>\*\*|[\)\]])?"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_WRAPPED_RE = re.compile(
    r"\\(?:boxed|text|textbf|mathrm)\{\s*\(?\s*(?P<tok>[A-Za-z0-9])\s*\)?\s*\}"
)
_BOLD_RE = re.compile(r"\*\*\s*\(?(?P<tok>[A-Z0-9])\)?(?:[\.\):][^*\n]*)?\*\*")
_PAREN_RE = re.compile(r"\((?P<tok>[A-Z0-9])\)")
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9'’\\])(?P<tok>[A-Z0-9])(?![A-Za-z0-9'’])")


def extract_choice_letter(text: str, labels: Sequence[str] = "ABCD") -> str | None:
    """The chosen option as a letter "A", "B", ... from free-form model output; None if none is found.

    ``labels`` are the labels shown to the model, letters or digits ("1234" maps 1→A, 2→B, ...).
    Explicit answer phrases win over bold or parenthesised letters, which win over the last standalone
    label; a capital "A" or "I" followed by a lowercase word is read as the article or the pronoun, not as a choice.
    """
    text = text or ""
    labels = [str(label).strip() for label in labels]
    index = {label.upper(): i for i, label in enumerate(labels)}

    def letter(tok: str) -> str | None:
        i = index.get(tok.upper())
        return _LETTERS[i] if i is not None else None

    # Tier 1: an explicit answer phrase, or a LaTeX-wrapped label; the last one counts.
    found: list[tuple[int, str]] = []
    for m in _CUE_RE.finditer(text):
        tok = m.group("tok")
        wrapped = bool(m.group("open") or m.group("close"))
        after = text[m.end():m.end() + 2]
        # A lowercase token is a label only when wrapped ("(d)") or at the end of a clause ("is d.").
        if tok.islower() and not (wrapped or not after.strip() or after[0] in ".,;)\n"):
            continue
        if (lab := letter(tok)) is not None:
            found.append((m.start("tok"), lab))
    for m in _WRAPPED_RE.finditer(text):
        if (lab := letter(m.group("tok"))) is not None:
            found.append((m.start("tok"), lab))
    if found:
        return max(found)[1]

    # Tiers 2-4: bold, parenthesised, then any standalone label.
    for pattern in (_BOLD_RE, _PAREN_RE, _STANDALONE_RE):
        last = None
        for m in pattern.finditer(text):
            tok = m.group("tok")
            if pattern is _STANDALONE_RE and tok in "AI" and re.match(r"\s+[a-z]", text[m.end():]):
                continue  # "A planet ..." — the article; "I think ..." — the pronoun (labels up to J)
            if pattern is _STANDALONE_RE and tok.isdigit():
                continue  # bare digits in prose are quantities, not labels
            if (lab := letter(tok)) is not None:
                last = lab
        if last is not None:
            return last
    return None


# ---------------------------------------------------------------- MATH answers

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")


def _closing_brace(s: str, open_at: int) -> int:
    """Index of the "}" matching the "{" at ``open_at`` (escaped braces skipped), or -1."""
    depth = 0
    i = open_at
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), nested braces included; None if absent or unclosed."""
    matches = list(_BOXED_RE.finditer(text or ""))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        start = len(rest) - len(stripped)
        end = _closing_brace(rest, start)
        return rest[start + 1:end].strip() if end >= 0 else None
    # "\boxed 5": one token
    m = re.match(r"\s+([^\s$]+)", rest)
    return m.group(1).rstrip(".") if m else None


_FINAL_ANSWER_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """The model's MATH answer: the last ``\\boxed{}``, else what follows "final answer is" / "the answer is"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_FINAL_ANSWER_RE.finditer(text or ""))
    if not phrases:
        return None
    ans = text[phrases[-1].end():].split("\n", 1)[0].strip()
    if (math_mode := re.match(r"\$+([^$]+)\$", ans)) is not None:
        ans = math_mode.group(1)
    else:
        # "The final answer is 5. I hope it is correct." — stop at the sentence end.
        ans = re.split(r"\.\s|\.$", ans, maxsplit=1)[0]
    return ans.strip() or None


def _unwrap(s: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{content}`` by ``content`` for each command, nested braces included."""
    pattern = re.compile(r"\\(?:" + "|".join(commands) + r")\s*\{")
    while (m := pattern.search(s)) is not None:
        end = _closing_brace(s, m.end() - 1)
        if end < 0:
            break
        s = s[:m.start()] + s[m.end():end] + s[end + 1:]
    return s


def normalize_math_answer(answer: str) -> str:
    """Canonical string for a MATH answer: no $, spacing, \\left/\\right, \\text, units, degrees or \\%."""
    s = (answer or "").strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = _unwrap(s, ["text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mbox"])
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\[!,;:> ]|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    # Trailing unit words after a number: "10 degrees", "864 inches^2", "\frac{270}7 degrees".
    s = re.sub(r"(?<=[\d}])\s+(?:[A-Za-z]{2,}\.?\s*)+(?:\^\s*\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    # A lone "x=5" answers the same as "5".
    if (m := re.fullmatch(r"[A-Za-z]=([^=]+)", s)) is not None:
        s = m.group(1)
    # LaTeX shorthands: \sqrt2 → \sqrt{2}, \frac43 → \frac{4}{3}, \frac{270}7 → \frac{270}{7}.
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if (m := re.fullmatch(r"\(([A-Za-z])\)", s)) is not None:
        s = m.group(1)
    return s
