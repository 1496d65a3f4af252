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

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

# ----------------------------------------------------------------------------- VQA normalisation
# The official VQA evaluation's tables (vqaEval.py of the VQA API), entry for entry, including its
# odd ones ("somebody'd" -> "somebodyd"), so scores match the published numbers.
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
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
# The official pattern, typo included: "(?!<=\d)" is a look-ahead that never fires, so in effect a
# period is removed unless a digit follows it ("2.5" stays, "dog." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) positionally, i.e. as the replacement count.
    return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation: whitespace, punctuation, case, numbers, articles,
    contractions.

    Examples
    --------
    >>> normalize_vqa_answer("Two dogs!")
    '2 dogs'
    >>> [normalize_vqa_answer(t) for t in ("The cat's toy.", "dont", "1,000")]
    ["cat's toy", "don't", '1000']
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


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
