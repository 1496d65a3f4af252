"""Gold-answer conventions that capture and analysis share: the official VQA normalisation.

Capture teacher-forces the answer most annotators gave *as the VQA evaluation counts answers*
(:func:`most_common_answer`); analysis scores generated answers with the same normalisation
(``analyze.evaluators``). Pure string functions, no dependencies.

Examples
--------
>>> most_common_answer(["Nokia", "nokia", "lg", "lg", "NOKIA."])
'Nokia'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def most_common_answer(answers: Sequence[str], normalise: bool = True) -> str:
    """The answer most annotators gave: the largest group of equal answers (equal after
    :func:`normalize_vqa_answer` with ``normalise``), as first spelled; ties keep list order.
    Answers that are blank (or normalise to nothing, like ``"?"``) never win while another
    exists, and the spelling returned is never blank while a non-blank answer exists.

    >>> most_common_answer(["a cat", "dog", "Dog!", "cat", "the dog"])
    'dog'
    >>> most_common_answer(["a cat", "dog", "Dog!", "cat", "the dog"], normalise=False)
    'a cat'
    >>> most_common_answer(["", "", "no"]), most_common_answer(["", "?", "?"])
    ('no', '?')
    """
    groups: dict[str, list[str]] = {}
    for answer in answers:
        key = normalize_vqa_answer(answer) if normalise else answer
        groups.setdefault(key, []).append(answer)
    ranked = sorted(groups.items(), key=lambda kv: (not kv[0].strip(), -len(kv[1])))  # stable: list order
    spelled = [a for a in ranked[0][1] if a.strip()] or [a for a in answers if a.strip()] or [""]
    return spelled[0]
