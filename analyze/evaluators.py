"""Strict answer evaluators of the benchmarks, as pure functions (capture only records texts).

- DocVQA: ANLS with threshold 0.5, as the DocVQA challenge's evaluation script computes it.
- ChartQA: relaxed accuracy (a number within 5% of the target, else case-insensitive exact match),
  as in the Pix2Struct / MatCha evaluation.
- TextVQA / VQAv2: VQA accuracy with the official answer normalisation; each of the n human
  answers is left out in turn and the prediction scores min(#matches among the rest / 3, 1); the
  mean over the n leave-one-out sets is the score (for 10 answers, the 10-choose-9 average).
- ScienceQA: choice match (the chosen option's text, or its letter when the choices are known).

Containment ("the gold answer appears somewhere in the output") is deliberately absent.

Examples
--------
>>> evaluate("chartqa", "10.4", ["10"])
1.0
>>> evaluate("docvqa", "Dare", ["date"])
0.75
>>> round(evaluate("vqav2", "Two", ["2"] * 2 + ["3"] * 8), 4)
0.6
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official VQA answer normalisation lives in schemas: capture picks the teacher-forced
# answer with it too.
from schemas.answers import normalize_vqa_answer

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: the mean over leave-one-out sets of min(#matching answers / 3, 1).

    Prediction and human answers are normalised with :func:`normalize_vqa_answer` (always: the
    original script skipped it when all 10 answers agree, which only differs for un-normalised
    predictions such as ``"Yes"`` and made those count as wrong).

    Parameters
    ----------
    prediction : str
        The model's answer.
    answers : sequence of str
        The human answers (10 for VQAv2 / TextVQA).

    Returns
    -------
    float
        In [0, 1]; 0 when there are no answers.

    Examples
    --------
    With 10 answers of which k match, the score is mean_i min(#others matching / 3, 1):

    >>> [round(vqa_accuracy("a", ["a"] * k + ["b"] * (10 - k)), 4) for k in range(5)]
    [0.0, 0.3, 0.6, 0.9, 1.0]
    """
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    gold = [normalize_vqa_answer(a) for a in answers]
    matches = sum(g == pred for g in gold)
    total = 0.0
    for g in gold:
        others = matches - (g == pred)  # the matches left when this human answer is held out
        total += min(1.0, others / 3.0)
    return total / len(gold)


# ----------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    >>> levenshtein("kitten", "sitting"), levenshtein("", "abc"), levenshtein("same", "same")
    (3, 3, 0)
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one question (DocVQA).

    Both texts are lowercased, stripped and whitespace-collapsed; the distance is divided by the
    longer of the two normalised lengths (the DocVQA script measures both after normalising);
    the best answer counts; a similarity below ``threshold`` scores 0.

    Examples
    --------
    >>> anls("Hello", ["hello"])
    1.0
    >>> round(anls("helo", ["hello", "bye"]), 4)
    0.8
    >>> anls("abcdef", ["abc"])  # similarity 0.5 is kept (the threshold drops only < 0.5)
    0.5
    >>> anls("abcdefg", ["abc"])
    0.0
    >>> round(anls("12    march", ["12 may"]), 4)  # distance 3 over 8 normalised characters
    0.625
    """
    if not answers:
        return 0.0
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gold = " ".join(answer.strip().lower().split())
        length = max(len(gold.upper()), len(pred.upper()))
        distances.append(0.0 if length == 0 else levenshtein(gold, pred) / length)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


# ----------------------------------------------------------------------------- ChartQA

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness of one prediction against one target.

    A numeric target (not 0) accepts a numeric prediction within ``tolerance`` relative change
    ("12%" reads as 0.12); anything else needs a case-insensitive exact match.

    Examples
    --------
    >>> relaxed_match("10.5", "10"), relaxed_match("10.6", "10"), relaxed_match("Yes", "yes")
    (True, False, True)
    >>> relaxed_match("50%", "0.5"), relaxed_match("0.01", "0")
    (True, False)
    """
    prediction, target = prediction.strip(), target.strip()
    pred_value, target_value = _to_float(prediction), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str],
                     tolerance: float = RELAXED_TOLERANCE) -> float:
    """1.0 when the prediction relaxed-matches any target, else 0.0.

    >>> relaxed_accuracy("1.02", ["2", "1"])
    1.0
    """
    return float(any(relaxed_match(prediction, t, tolerance) for t in answers))


# ----------------------------------------------------------------------------- ScienceQA

_LETTER = re.compile(r"^\(?([A-Za-z])[\).:]?$")
_LABELLED = re.compile(r"^\(?([A-Za-z])[\).:]\s*(\S.*)$")  # "(B) venus", "B. venus", "B: venus"


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def choice_match(prediction: str, answer: str, choices: Sequence[str] | None = None) -> float:
    """ScienceQA: 1.0 when the prediction names the gold choice, else 0.0.

    The prediction matches the gold choice's text (ignoring case, punctuation and spacing) or,
    when ``choices`` are given, is its option letter ("B", "(B)", "B.").

    Examples
    --------
    >>> choice_match("Mercury.", "mercury"), choice_match("(B)", "venus", ["mercury", "venus"])
    (1.0, 1.0)
    >>> choice_match("A", "venus", ["mercury", "venus"]), choice_match("venus or mars", "venus")
    (0.0, 0.0)
    """
    if _plain(prediction) == _plain(answer):
        return 1.0
    letter = _LETTER.match(prediction.strip())
    if choices and letter:
        k = ord(letter.group(1).upper()) - ord("A")
        return float(0 <= k < len(choices) and _plain(choices[k]) == _plain(answer))
    return 0.0


def scienceqa_match(prediction: str, answers: Sequence[str]) -> float:
    """ScienceQA with its gold ``answers`` ``[choice text, option letter]``: the prediction names
    either, or both as a labelled option ("(B) venus", "B. venus"; letter and text must agree).

    Examples
    --------
    >>> [scienceqa_match(p, ["venus", "B"]) for p in ("Venus", "(B)", "B. venus", "(B) mars", "A. venus")]
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """
    if any(choice_match(prediction, a) for a in answers):
        return 1.0
    labelled = _LABELLED.match(prediction.strip())
    if labelled is None:
        return 0.0
    letter, text = labelled.groups()
    return float(choice_match(letter, answers[-1]) == 1.0 and choice_match(text, answers[0]) == 1.0)


# ----------------------------------------------------------------------------- dispatch

def evaluate(dataset_name: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with the dataset's own metric, in [0, 1].

    ``synthetic`` uses relaxed accuracy (its answers are exact words or small integers).

    Examples
    --------
    >>> evaluate("scienceqa", "venus", ["Venus"]), evaluate("synthetic", "Red", ["red"])
    (1.0, 1.0)
    >>> evaluate("mnist", "1", ["1"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: no evaluator for dataset 'mnist'; known: chartqa, docvqa, ...
    """
    if dataset_name in ("chartqa", "synthetic"):
        return relaxed_accuracy(prediction, answers)
    if dataset_name == "docvqa":
        return anls(prediction, answers)
    if dataset_name in ("textvqa", "vqav2"):
        return vqa_accuracy(prediction, answers)
    if dataset_name == "scienceqa":
        return scienceqa_match(prediction, answers)
    known = "chartqa, docvqa, scienceqa, synthetic, textvqa, vqav2"
    raise ValueError(f"no evaluator for dataset {dataset_name!r}; known: {known}")
