"""Hard / easy / medium labels from question keywords, assigned to each sample at load time.

The cues are RESEARCH.md's ("Subsets, data and scoring"): in ChartQA and DocVQA a hard cue (a
comparison, a count, a lookup in a table) makes a question hard, else an easy cue (a plain
attribute) makes it easy, else the dataset's own level applies (ChartQA and DocVQA hard, TextVQA
and ScienceQA medium, VQAv2 easy). A better label comes later from a run's truncation results
(``analyze.subsets.relabel``).

Examples
--------
>>> label_subset("chartqa", "What is the difference between 2019 and 2020?")
'hard'
>>> label_subset("vqav2", "What color is the bus?")
'easy'
>>> label_subset("textvqa", "What does the sign say?")
'medium'
>>> label_subset("vqav2", "What color is the table?")  # a document cue means nothing on a photo
'easy'
"""

from __future__ import annotations

import re

# RESEARCH.md's lists; the superlatives extend "maximum"/"minimum" and "higher"/"lower" to the
# forms chart questions actually use ("which bar is highest"), matched as whole words.
_CHART_HARD = ("compare", "difference", "between", "trend", "increase", "decrease", "higher",
               "lower", "which", "how many", "maximum", "minimum", "average", "total",
               "percentage", "highest", "lowest", "largest", "smallest", "tallest", "shortest")
_DOC_HARD = ("table", "which column", "which row", "address", "date", "total", "sum", "header",
             "footer", "section")
_EASY = ("what color", "what colour", "what is this", "is there", "yes or no", "what type",
         "what kind")

# Hard cues exist for the chart and document datasets only (RESEARCH.md): on photos and science
# questions they misfire ("what color is the table?", ScienceQA's every "Which of these ..."), so
# there an easy cue or the dataset's own level decides.
HARD_CUES: dict[str, tuple[str, ...]] = {
    "chartqa": _CHART_HARD,
    "docvqa": _DOC_HARD,
    "synthetic": _CHART_HARD + _DOC_HARD,  # chart- and document-like images
}
DEFAULT_LEVEL: dict[str, str] = {
    "chartqa": "hard", "docvqa": "hard", "textvqa": "medium", "vqav2": "easy",
    "scienceqa": "medium", "synthetic": "hard",
}
SUBSET_LEVELS = ("hard", "medium", "easy")


def _has_cue(text: str, cues: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(cue)}\b", text) for cue in cues)


def label_subset(dataset: str, question: str, mode: str = "keywords") -> str:
    """The subset label of one question.

    Parameters
    ----------
    dataset : str
        A dataset name of ``schemas.config.DatasetName``.
    question : str
        The question text (case does not matter).
    mode : str
        ``data.subset``: ``"keywords"`` (the heuristic), ``"all_hard"`` or ``"all_easy"``.

    Returns
    -------
    str
        ``"hard"``, ``"medium"`` or ``"easy"``.

    Examples
    --------
    >>> label_subset("docvqa", "What is the date on the letter?")
    'hard'
    >>> label_subset("chartqa", "What color is the largest bar?")
    'hard'
    >>> label_subset("chartqa", "what is this", mode="all_easy")
    'easy'
    """
    if mode == "all_hard":
        return "hard"
    if mode == "all_easy":
        return "easy"
    text = " ".join(question.lower().split())
    # A comparison or lookup decides difficulty even inside an attribute question.
    if _has_cue(text, HARD_CUES.get(dataset, ())):
        return "hard"
    if _has_cue(text, _EASY):
        return "easy"
    return DEFAULT_LEVEL.get(dataset, "medium")
