"""Answer extraction and scoring on real answer formats and real benchmark items."""

from __future__ import annotations

import pytest

from edge_ensemble.eval import scoring
from edge_ensemble.eval.scoring import (
    extract_boxed,
    extract_choice_letter,
    extract_code_completion,
    extract_gsm8k_answer,
    extract_last_number,
    extract_math_answer,
    math_equal,
    normalize_math_answer,
    normalize_number,
    mcnemar_exact,
    wilson_interval,
)
from edge_ensemble.eval.tasks import get_task

# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "number", "canonical"),
    [
        ("1,234", "1,234", "1234"),
        ("$1,234.50", "$1,234.50", "1234.5"),
        ("-7", "-7", "-7"),
        ("12 apples", "12", "12"),
        ("The answer is 42.", "42", "42"),
        ("She had 3 apples, then 5 more, so 8 in total.", "8", "8"),
        ("5-3=2", "2", "2"),
        ("It costs 18.00 dollars", "18.00", "18"),
    ],
)
def test_extract_last_number(text: str, number: str, canonical: str) -> None:
    assert extract_last_number(text) == number
    assert normalize_number(number) == canonical


def test_no_number() -> None:
    assert extract_last_number("no digits here") is None
    assert normalize_number("twelve") is None


def test_answer_phrase_beats_a_later_remark() -> None:
    text = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is 18.\n\nNote: she eats 3 eggs."
    assert extract_last_number(text) == "3"
    assert extract_gsm8k_answer(text) == "18"
    assert extract_gsm8k_answer("So she pays $1,000 in total.") == "$1,000"


def test_numbers_equal() -> None:
    assert scoring.numbers_equal("$1,000.00", "1000")
    assert not scoring.numbers_equal("1001", "1000")
    assert not scoring.numbers_equal(None, "1000")


def test_gsm8k_gold_of_real_items_is_an_integer() -> None:
    items = get_task("gsm8k").items(0, 5)
    assert [item.id for item in items] == ["0", "1", "2", "3", "4"]
    assert items[0].gold == "18"
    for item in items:
        int(item.gold)


# ---------------------------------------------------------------- choice letters


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (B).", "B"),
        ("Answer: B", "B"),
        ("**B**", "B"),
        ("**Answer:** D", "D"),
        ("The correct answer is **C. Planetary days will become shorter.**", "C"),
        ("I think the correct choice is C because faster rotation shortens the day.", "C"),
        ("Answer: (d)", "D"),
        ("The answer is $\\boxed{B}$", "B"),
        ("\\text{(B)}", "B"),
        ("C. Planetary days will become shorter.", "C"),
        ("Option A is wrong. Option B is wrong. So it must be C.", "C"),
        # "A" as an article must not win over the explicit answer that follows.
        ("A planet that spins faster has shorter days. The answer is C.", "C"),
        ("A faster spin means shorter days, so (C) it is, not A.", "C"),
        ("The answer is (B). Choice (C) is wrong because the year does not change.", "B"),
    ],
)
def test_extract_choice_letter(text: str, letter: str) -> None:
    assert extract_choice_letter(text) == letter


def test_choice_letter_absent_or_invalid() -> None:
    assert extract_choice_letter("A planet that spins faster has shorter days.") is None
    assert extract_choice_letter("The answer is (E).") is None  # only A-D are offered
    assert extract_choice_letter("The answer is (E).", "ABCDE") == "E"
    assert extract_choice_letter("") is None


def test_numeric_labels_map_to_letters() -> None:
    assert extract_choice_letter("The answer is (2).", "1234") == "B"
    assert extract_choice_letter("Answer: 4", "1234") == "D"
    assert extract_choice_letter("It has 3 moons, so the answer is 1", "1234") == "A"


def test_arc_items_are_parsed_from_the_query() -> None:
    item = get_task("arc-challenge").items(0, 1)[0]
    assert item.id == "Mercury_7175875"
    assert item.gold == "C"
    assert [label for label, _ in item.data["choices"]] == ["A", "B", "C", "D"]
    assert item.data["choices"][2][1] == "Planetary days will become shorter."


# ---------------------------------------------------------------- MATH


def test_extract_boxed_nested_and_last() -> None:
    assert extract_boxed("so \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert extract_boxed("first \\boxed{1}, finally \\boxed{\\frac{a}{\\sqrt{b}}}.") == "\\frac{a}{\\sqrt{b}}"
    assert extract_boxed("\\boxed 5.") == "5"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("no box") is None


def test_extract_math_answer_fallback_phrase() -> None:
    assert extract_math_answer("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.") == "\\frac{3}{4}"
    assert extract_math_answer("The final answer is 12. I hope it is correct.") == "12"
    assert extract_math_answer("I give up.") is None


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt2"),
        ("\\boxed{10^\\circ}", "10"),
        ("10 degrees", "10^{\\circ}"),
        ("\\text{(B)}", "B"),
        ("\\dfrac{3}{4}", "3/4"),
        ("\\frac43", "\\frac{4}{3}"),
        ("50\\%", "50"),
        ("\\$32,\\!348", "32348"),
        ("$864 \\mbox{ inches}^2$", "864"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("1, -2", "-2,1"),
        ("x = 5", "5"),
        ("\\text{Evelyn}", "Evelyn"),
        ("2.", "2"),
    ],
)
def test_math_equal(pred: str, gold: str) -> None:
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("(1,2)", "(2,1)"), ("[2,\\infty)", "(2,\\infty)"), ("0.33", "\\frac{1}{3}"), ("3", "2"), (None, "2")],
)
def test_math_not_equal(pred: str | None, gold: str) -> None:
    assert not math_equal(pred, gold)


def test_math_500_golds_normalise_to_themselves() -> None:
    items = get_task("math-500").items(0, 30)
    assert items[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    for item in items:
        once = normalize_math_answer(item.gold)
        assert normalize_math_answer(once) == once
        assert math_equal(item.gold, item.gold)
        assert math_equal(f"so the answer is $\\boxed{{{item.gold}}}$.", item.gold)


# ---------------------------------------------------------------- HumanEval completions


def test_extract_code_completion() -> None:
    full = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code_completion(full, "add") == "\ndef add(a, b):\n    return a + b\n"
    body = "```python\nreturn a + b\n```"
    assert extract_code_completion(body, "add") == "    return a + b\n"
    raw = "    return a + b"
    assert extract_code_completion(raw, "add") == "    return a + b\n"
    truncated = "```python\ndef add(a, b):\n    return a +"
    assert extract_code_completion(truncated, "add").startswith("\ndef add(a, b):")


# ---------------------------------------------------------------- statistics


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)  # ten discordant items, all one way
    assert mcnemar_exact(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert mcnemar_exact(2, 6) == mcnemar_exact(6, 2)  # symmetric
    assert mcnemar_exact(5, 5) == 1.0  # capped: an even split is no evidence either way
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_branches_vote_on_canonical_answers():
    """"$1,250" and "1250" are one GSM8K answer when branches vote (the score already treated them alike)."""
    from edge_ensemble.branching import majority_vote
    from edge_ensemble.eval.tasks import get_task

    gsm8k = get_task("gsm8k")
    item = gsm8k.items(0, 1)[0]
    texts = ["So the total is $1,250. The answer is $1,250", "The answer is 1250", "The answer is 99"]
    answers = [gsm8k.vote_answer(item, t) for t in texts]
    assert answers[0] == answers[1] != answers[2]
    assert majority_vote(answers, [-3.0, -2.0, -0.1]) == 1  # two votes beat the likelier single one
    assert gsm8k.vote_answer(item, "no number here") is None
