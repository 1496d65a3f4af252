"""Evaluators on hand cases, published examples and independent re-implementations; relabelling."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.evaluators import (anls, choice_match, evaluate, levenshtein, normalize_vqa_answer,
                                relaxed_accuracy, relaxed_match, vqa_accuracy)
from analyze.subsets import relabel


# ----------------------------------------------------------------------------- VQA accuracy

@pytest.mark.parametrize("raw,expected", [
    # the normalisation steps listed on the VQA evaluation page
    ("Two", "2"), ("The dog", "dog"), ("a man", "man"), ("dont", "don't"),
    ("100,978", "100978"), ("2.5", "2.5"), ("yes.", "yes"), ("Red!", "red"),
    ("black-and-white", "black and white"), ("black - white", "black white"),
    ("  it's\tten\n", "it's 10"), ("none", "0"), ("Isnt", "isn't"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def _vqa_by_subsets(pred: str, answers: list[str]) -> float:
    """Independent: the official definition, averaging over every (n-1)-subset of the answers."""
    pred = normalize_vqa_answer(pred)
    gold = [normalize_vqa_answer(a) for a in answers]
    subsets = list(combinations(range(len(gold)), len(gold) - 1))
    return sum(min(1.0, sum(gold[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                        (10, 1.0)])
def test_vqa_accuracy_closed_form(k, expected):
    # k of 10 humans agree with the prediction: (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["2", "two", "a cat", "cat", "dog", "Yes", "no"]),
                min_size=1, max_size=10),
       st.sampled_from(["2", "cat", "the dog", "yes", "maybe"]))
def test_vqa_accuracy_equals_subset_average(answers, pred):
    assert vqa_accuracy(pred, answers) == pytest.approx(_vqa_by_subsets(pred, answers))


def test_vqa_edge_cases():
    assert vqa_accuracy("x", []) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # normalised even when the humans agree


# ----------------------------------------------------------------------------- ANLS

@lru_cache(maxsize=None)
def _lev(a: str, b: str) -> int:
    """Independent recursive edit distance."""
    if not a or not b:
        return len(a) + len(b)
    return min(_lev(a[1:], b) + 1, _lev(a, b[1:]) + 1, _lev(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=80, deadline=None)
@given(st.text("abc ", max_size=7), st.text("abc ", max_size=7))
def test_levenshtein_matches_recursive_definition(a, b):
    assert levenshtein(a, b) == _lev(a, b)


def test_anls_hand_cases():
    assert anls("  HELLO   world ", ["hello world"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)        # 1 edit / 5
    assert anls("abcdef", ["abc"]) == pytest.approx(0.5)        # 3 / 6: kept at the threshold
    assert anls("abcdefg", ["abc"]) == 0.0                      # 4 / 7 > 0.5
    assert anls("2017", ["2016", "2017"]) == 1.0                # best gold answer counts
    assert anls("", [""]) == 1.0 and anls("x", []) == 0.0
    # an OCR-like slip is partly right (ANLS's purpose), a wrong word is not
    assert anls("Coca Cola", ["coca-cola"]) == pytest.approx(1 - 1 / 9)
    assert anls("Pepsi", ["coca-cola"]) == 0.0


# ----------------------------------------------------------------------------- relaxed accuracy

@pytest.mark.parametrize("pred,target,ok", [
    ("105", "100", True), ("95", "100", True), ("105.1", "100", False), ("94.9", "100", False),
    ("-10.4", "-10", True), ("12%", "0.12", True), ("12", "12%", False), ("0", "0", True),
    ("0.0", "0", False),  # a zero target has no relative tolerance: exact text only
    ("Yes", "yes", True), (" Democrats ", "democrats", True), ("Dem", "democrats", False),
    ("1,000", "1000", False),  # the reference implementation does not parse thousands separators
])
def test_relaxed_match(pred, target, ok):
    assert relaxed_match(pred, target) is ok


def test_relaxed_accuracy_any_target():
    assert relaxed_accuracy("7", ["6", "7.2"]) == 1.0
    assert relaxed_accuracy("7", ["6", "8"]) == 0.0
    assert relaxed_accuracy("7", []) == 0.0


# ----------------------------------------------------------------------------- ScienceQA

def test_choice_match():
    choices = ["a solid", "a liquid", "a gas"]
    assert choice_match("A liquid.", "a liquid", choices) == 1.0
    assert choice_match("(B)", "a liquid", choices) == 1.0
    assert choice_match("b", "a liquid", choices) == 1.0
    assert choice_match("C.", "a liquid", choices) == 0.0
    assert choice_match("D", "a liquid", choices) == 0.0       # no such option
    assert choice_match("B", "a liquid") == 0.0               # a letter needs the choices
    assert choice_match("a liquid or a gas", "a liquid", choices) == 0.0


def test_evaluate_dispatch():
    assert evaluate("chartqa", "10.3", ["10"]) == 1.0
    assert evaluate("docvqa", "helo", ["hello"]) == pytest.approx(0.8)
    assert evaluate("textvqa", "two", ["2", "2", "2", "3"]) == pytest.approx(0.75)
    assert evaluate("vqav2", "no", ["yes"] * 10) == 0.0
    assert evaluate("scienceqa", "Venus", ["venus"]) == 1.0
    # a ScienceQA run's gold answers are the choice and its option letter (capture.datasets)
    golds = ["venus", "B"]
    assert [evaluate("scienceqa", p, golds) for p in ("B", "(B)", "B.", "venus", "A", "(A) venus")] == \
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # a labelled option counts when its letter and its text both name the gold choice
    assert [evaluate("scienceqa", p, golds) for p in ("(B) venus", "B. Venus", "B: venus", "(B) mars",
                                                      "B venus")] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert evaluate("synthetic", "march 14", ["march 14"]) == 1.0
    assert evaluate("synthetic", "march 1", ["march 14"]) == 0.0
    # containment is not an evaluator
    assert evaluate("chartqa", "the answer is 10", ["10"]) == 0.0
    with pytest.raises(ValueError, match="no evaluator"):
        evaluate("coco", "x", ["x"])


# ----------------------------------------------------------------------------- relabel

def test_relabel_hand_cases():
    nan = np.nan
    clean = np.array([1.0, 1.0, 0.0, 1.0, nan, 0.9])
    trunc = np.array([
        [0, 0, 0, 1],          # lost in 3/4 > 0.5 -> hard
        [0, 1, 1, 1],          # lost in 1/4 (only the earliest layer) -> easy
        [0, 0, 0, 0],          # wrong on the clean input -> fallback
        [nan, nan, nan, nan],  # no truncation result -> fallback
        [0, 0, 0, 0],          # clean unknown -> fallback
        [0.3, 0.2, 1.0, nan],  # scores below 0.5 lost in 2/3 -> hard
    ])
    fallback = np.array(["easy", "hard", "hard", "medium", "easy", "easy"])
    assert relabel(clean, trunc, fallback).tolist() == [
        "hard", "easy", "hard", "medium", "easy", "hard"]
    assert relabel(clean, trunc).tolist()[2:5] == ["unsolved"] * 3
    # the (sample, trunc_layer, mode) layout flattens over the trailing dims
    cube = trunc.reshape(6, 2, 2)
    assert relabel(clean, cube, fallback).tolist() == relabel(clean, trunc, fallback).tolist()
    # a stricter rule: any loss makes a sample hard
    assert relabel(clean[:2], trunc[:2], min_lost_fraction=0.0).tolist() == ["hard", "hard"]
    with pytest.raises(ValueError, match="fallback has shape"):
        relabel(clean, trunc, fallback[:2])


def test_analyze_modules_do_not_import_torch():
    code = ("import sys, analyze.evaluators, analyze.subsets; "
            "assert 'torch' not in sys.modules and 'capture' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
