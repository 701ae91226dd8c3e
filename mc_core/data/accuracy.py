"""Answer normalisation and the two answer metrics: exact match and VQA soft accuracy.

Normalisation follows the rules of the official VQA evaluation (Antol et al., 2015;
Goyal et al., 2017), reimplemented here:

1. newlines and tabs become spaces, surrounding spaces go, everything is lower-cased;
2. punctuation: ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are removed when they touch a
   space or when the answer has a thousands comma between digits (``1,000`` -> ``1000``), and
   replaced by a space otherwise (``black/white`` -> ``black white``); a period is removed
   unless a digit follows it (``3.5`` stays, ``yes.`` -> ``yes``);
3. per word: number words ``none``/``zero``..``ten`` become digits, the articles ``a``,
   ``an``, ``the`` are dropped, and contractions typed without an apostrophe get it back
   (``dont`` -> ``don't``, ``couldnt've`` -> ``couldn't've``) through the official table.

This is ``processPunctuation`` + ``processDigitArticle`` of the official ``vqaEval.py`` (the same
steps as EvalAI's answer processor, which LLaVA runs on its VQAv2 predictions), applied to both
sides always; the official script skips it when all ten human answers are identical, which only
matters for unnormalised predictions. GQA's evaluator compares strings exactly (LLaVA lower-cases
and strips a final period first); the same normalisation is used for it so both datasets score
a prediction alike ("Two." == "2").

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
# The official table (vqaEval.py `contractions`, also EvalAI's / LLaVA's m4c_evaluator), verbatim
# so scores match theirs, quirks included: its keys are spellings missing one or both apostrophes
# ("couldnt've", "couldn'tve", not "couldntve"); "Im", "Ive", "Id've", "I'dve" are capitalised
# and never match the lower-cased words; "somebody'd" maps to "somebodyd"; "well", "were",
# "hell", "its", "id", "shed", "wed" are absent, so those words stay.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


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
