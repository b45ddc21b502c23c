"""Prompt sets for checking an ensemble across languages, and a loop detector for its answers (used by
``benchmarks/languages.py`` and the test suite)."""

from __future__ import annotations

import re

ENGLISH = {
    "sky": "Explain in two sentences why the sky is blue.",
    "rivers": "Write two short paragraphs about rivers, with a blank line between them.",
    "fib": "Write a Python function that returns the n-th Fibonacci number, with a docstring and a loop.",
    "fruits": "Give a numbered list of five fruits and one fact about each.",
    "math": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?",
    "email": "Write a short, polite email asking a colleague to review a report by Friday.",
    "history": "Summarize the causes of the French Revolution in three sentences.",
    "emoji": "Describe a sunny day at the beach using lots of emoji 🌞🏖️ in every sentence.",
}
NON_ENGLISH = {
    "japanese": "東京は日本の首都で、",
    "japanese-question": "日本の四季について簡単に説明してください。",
    "chinese": "请用两句话介绍一下长城。",
    "chinese-math": "小明有5个苹果，又买了3个，现在有几个？",
    "korean": "서울에 대해 두 문장으로 설명해 주세요.",
    "russian": "Кратко объясни, почему небо голубое.",
    "arabic": "ما هي عاصمة فرنسا؟",
    "hindi": "भारत की राजधानी क्या है?",
}


def longest_run(text: str) -> int:
    """Longest run of one character, or of one 2-6 character unit repeated."""
    best = max((len(m.group(0)) for m in re.finditer(r"(.)\1*", text)), default=0)
    for m in re.finditer(r"(.{2,6}?)\1+", text):
        best = max(best, len(m.group(0)) // len(m.group(1)))
    return best
