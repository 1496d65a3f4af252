"""Judging truncated runs: per-sample correctness and accuracy curves per subset and mode.

Capture stores raw numbers and texts (``trunc_logp``, ``trunc_text`` with dims sample x
trunc_layer x mode; ``trunc_layer = -1`` is the untruncated baseline); judging them is analysis
(curves per subset are :func:`analyze.stats.subset_means` of the result):

- from ``trunc_text`` through the dataset's evaluator (``analyze.evaluators.evaluate``), a score
  in [0, 1] (VQA accuracy can be fractional);
- from ``trunc_logp`` alone when no text was generated: correct when ``p(answer) > 1/2``.  Every
  answer token then has conditional probability above 1/2, so it is the greedy choice at each
  step and greedy decoding starts with the gold answer (the answer is teacher-forced without an
  end token, so what follows it is not judged): the answer is the model's greedy choice.

Examples
--------
>>> correctness_from_logprob(np.array([np.log(0.9), np.log(0.1), np.nan])).tolist()
[1.0, 0.0, nan]
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from schemas.errors import GapError

__all__ = ["correctness_from_logprob", "correctness_from_text", "parse_answers"]

LOG_HALF = float(np.log(0.5))


def correctness_from_logprob(logp: np.ndarray) -> np.ndarray:
    """1.0 where the teacher-forced answer has probability above 1/2, else 0.0; NaN stays NaN."""
    logp = np.asarray(logp, dtype=np.float64)
    return np.where(np.isfinite(logp), (logp > LOG_HALF).astype(np.float64), np.nan)


def parse_answers(raw: str, sample: str = "?") -> list[str]:
    """The gold answers of one sample from the run's JSON list string.

    >>> parse_answers('["4", "four"]')
    ['4', 'four']
    """
    try:
        value = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        raise GapError(f"sample {sample}: 'answers' is not a JSON list: {raw[:60]!r}") from None
    if not isinstance(value, list):
        raise GapError(f"sample {sample}: 'answers' is not a JSON list: {raw[:60]!r}")
    return [str(v) for v in value]


def correctness_from_text(texts: np.ndarray, answers: Sequence[Sequence[str]],
                          score: Callable[[str, Sequence[str]], float]) -> np.ndarray:
    """Evaluator scores of generated texts, shape of ``texts`` (samples first).

    An empty text is an answer (the model stopped at once) and is scored, as wrong unless a gold
    answer is empty; a generation that failed leaves its sample's status ``error``, and those
    samples are not analysed. A value that is not a string (missing) scores NaN.

    Parameters
    ----------
    texts : array of str, shape (n_samples, ...)
    answers : the gold answers of each sample
    score : ``score(prediction, answers) -> float``, e.g. a dataset's evaluator

    Examples
    --------
    >>> exact = lambda p, golds: float(p.strip().lower() in [g.lower() for g in golds])
    >>> correctness_from_text(np.array([["Red", ""], ["blue", None]], dtype=object), [["red"], ["red"]],
    ...                       exact).tolist()
    [[1.0, 0.0], [0.0, nan]]
    """
    texts = np.asarray(texts, dtype=object)
    out = np.full(texts.shape, np.nan)
    for i in range(texts.shape[0]):
        for idx in np.ndindex(texts.shape[1:]):
            text = texts[(i, *idx)]
            if isinstance(text, str):
                out[(i, *idx)] = float(score(text, answers[i]))
    return out
