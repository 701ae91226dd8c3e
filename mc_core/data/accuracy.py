"""Answer normalisation and the two answer metrics: exact match and VQA soft accuracy.

Normalisation follows the rules of the official VQA evaluation (Antol et al., 2015;
Goyal et al., 2017), reimplemented here:

1. newlines and tabs become spaces, surrounding spaces go, everything is lower-cased;
2. punctuation: ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are removed when they touch a
   space or when the answer has a thousands comma between digits (``1,000`` -> ``1000``), and
   replaced by a space otherwise (``black/white`` -> ``black white``); a period is removed
   unless a digit follows it (``3.5`` stays, ``yes.`` -> ``yes``);
3. per word: number words ``none``/``zero``..``ten`` become digits, the articles ``a``,
   ``an``, ``the`` are dropped, and contractions typed without their apostrophe get it back
   (``dont`` -> ``don't``).

VQA soft accuracy of a prediction against the ten human answers is the official one: for each
of the ten leave-one-out subsets of nine answers, ``min(1, #matches / 3)``; the mean of the ten.
With ``k`` of the ten humans agreeing with the prediction it is
``(k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10``: k = 0, 1, 2, 3, >=4 give
0, 0.3, 0.6, 0.9, 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose apostrophe-less spelling is not itself an English word (so "well",
# "were", "hell", "its", "id", "shed", "wed" are left alone).
_CONTRACTED = (
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "i'd've",
    "i'm",
    "i've",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd've",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
)
_CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTED}


def _punctuation(text: str) -> str:
    # Decisions look at the original text, replacements apply to the running output.
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQA-normalised form of an answer (see the module docstring).

    >>> normalize_answer("Two dogs!")
    '2 dogs'
    >>> normalize_answer("The  Red/White")
    'red white'
    """
    if not isinstance(text, str):
        raise ValueError(f"answer must be a string, got {type(text).__name__} {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    words = []
    for w in _punctuation(text).split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(pred: str, answer: str, *, normalize: bool = True) -> float:
    """1.0 when ``pred`` equals ``answer`` (both normalised unless ``normalize=False``)."""
    if normalize:
        return float(normalize_answer(pred) == normalize_answer(answer))
    return float(pred == answer)


def vqa_soft_accuracy(pred: str, answers: Sequence[str], *, normalize: bool = True) -> float:
    """Official VQA accuracy: mean over leave-one-out subsets of ``min(1, #matches / 3)``.

    Args:
        pred: the predicted answer.
        answers: the human answers (ten in VQAv2; any number >= 2 is accepted).
        normalize: normalise prediction and answers first.

    Raises:
        ValueError: fewer than two human answers.
    """
    answers = list(answers)
    if len(answers) < 2:
        raise ValueError(
            f"vqa_soft_accuracy needs at least 2 human answers (VQAv2 has 10), got {answers!r}"
        )
    if normalize:
        pred = normalize_answer(pred)
        answers = [normalize_answer(a) for a in answers]
    k = sum(a == pred for a in answers)
    n = len(answers)
    # Leaving out one of the k matching answers leaves k - 1 matches; leaving out any other, k.
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n
