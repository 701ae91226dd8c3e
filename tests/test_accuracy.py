"""VQA answer normalisation, exact match and VQA soft accuracy on hand-made answers."""

import pytest

from mc_core.data.accuracy import exact_match, normalize_answer, vqa_soft_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("  Two\tdogs!\n", "2 dogs"),  # number word -> digit; "!" touches nothing -> " "
        ("The red one", "red 1"),  # article dropped
        ("an apple", "apple"),
        ("none", "0"),
        ("black/white", "black white"),  # "/" inside a word becomes a space
        ("black / white", "black white"),  # "/" touching a space is removed
        ("1,000", "1000"),  # thousands comma: all punctuation removed
        ("3.5", "3.5"),  # decimal point kept
        ("yes.", "yes"),  # final period removed
        ("dont know", "don't know"),  # contraction restored
        ("well", "well"),  # not a contraction ("we'll" is not guessed)
        ("t-shirt", "t shirt"),
        ("(tennis)", "tennis"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_is_idempotent_and_rejects_non_strings():
    for s in ["The Two Cats.", "1,000 (approx)", "isnt it?"]:
        once = normalize_answer(s)
        assert normalize_answer(once) == once
    with pytest.raises(ValueError, match="answer must be a string, got int 3"):
        normalize_answer(3)


def test_exact_match():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("the cat", "Cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("Two", "2", normalize=False) == 0.0


def _ten(k: int, answer: str = "red", other: str = "blue") -> list[str]:
    return [answer] * k + [other] * (10 - k)


# Leave-one-out by hand, k of the 10 humans say the predicted answer:
#   the k subsets that drop a matching human keep k-1 matches -> min(1, (k-1)/3) each;
#   the 10-k subsets that drop another human keep k matches    -> min(1, k/3) each.
#   k=0: 0                                          = 0.0
#   k=1: (1*0     + 9*(1/3)) / 10 = 3/10            = 0.3
#   k=2: (2*(1/3) + 8*(2/3)) / 10 = (2/3+16/3)/10   = 0.6
#   k=3: (3*(2/3) + 7*1)     / 10 = (2+7)/10        = 0.9   (not 1.0: 3 subsets keep only 2 matches)
#   k=4: (4*1     + 6*1)     / 10                   = 1.0
#   k=10:                                           = 1.0
@pytest.mark.parametrize(
    ("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_vqa_soft_accuracy_leave_one_out(k, expected):
    # Sums of thirds in floating point: 1e-12 absorbs rounding, far below the 0.1 steps.
    assert vqa_soft_accuracy("red", _ten(k)) == pytest.approx(expected, abs=1e-12)


def test_vqa_soft_accuracy_normalises_both_sides():
    # "Two" == "2" == "two." after normalisation: 3 matches -> 0.9; without it only "2" counts.
    answers = ["2", "two.", "Two", "3", "3", "3", "4", "4", "4", "5"]
    assert vqa_soft_accuracy("two", answers) == pytest.approx(0.9, abs=1e-12)
    # Raw strings: only "Two" equals "Two" -> k = 1 -> 0.3.
    assert vqa_soft_accuracy("Two", answers, normalize=False) == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 human answers"):
        vqa_soft_accuracy("red", ["red"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # The official vqaEval.py table's keys miss one apostrophe or both, never two of two.
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("couldntve", "couldntve"),
        ("hes here", "he's here"),
        ("Im", "im"),  # the table's "Im" is capitalised: it never matches lower-cased text
        ("somebody'd", "somebodyd"),  # the table maps this one backwards
        ("shed", "shed"),
        ("its", "its"),
        # processPunctuation: a thousands comma anywhere strips every mark, without spaces.
        ("2,000 (approx.)", "2000 approx"),
        ("left-hand side!", "left hand side"),  # "-" and "!" touch no space: one space / none
        ("It is 3.5!", "it is 3.5"),
        ("No, it isn't.", "no it isn't"),
        ("Three", "3"),
        ("ten dogs and the cat", "10 dogs and cat"),
        ("eleven", "eleven"),  # the number map stops at ten
    ],
)
def test_normalize_answer_matches_the_official_vqa_eval(raw, expected):
    assert normalize_answer(raw) == expected
