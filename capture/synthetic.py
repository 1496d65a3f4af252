"""A synthetic chart / document question set whose answers are exact, deterministic by seed.

Each sample is drawn with PIL (fast enough to generate on the fly) from its own random stream
``(seed, split, row)``, so row ``i`` is the same whatever ``n`` is and a shard can draw only its
rows. Kinds:

- ``square_colour``: "what colour is the square?" (one of 4 colours; a square in one of 4 cells).
- ``bar_colour``: "what colour is the tallest bar?" (2-4 bars of distinct colours and heights).
- ``bar_highest``: "which bar is highest?" (bars labelled a, b, ...; the answer is the letter).
- ``bar_count``: "how many bars are there?" (a digit, 2-6).
- ``bar_value``: "what is the value of bar c?" (a digit, printed above each bar, ChartQA-like).
- ``table_date``: "what is the date in row b?" ("march 14", a DocVQA-like table).

The first four (``SIMPLE_KINDS``) have single-word answers from a closed set of at most 6 words
each, small enough to train a tiny model on. ``SYNTHETIC_VOCAB`` lists every word of every
question and answer under :func:`tokenize_words`.

Examples
--------
>>> s = generate(2, seed=0, kinds=["square_colour"])[0]
>>> s["question"], s["answer"] in COLOURS, s["image"].size
('what colour is the square?', True, (56, 56))
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
}
LETTERS = "abcdef"
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december")
SIMPLE_KINDS = ["square_colour", "bar_colour", "bar_highest", "bar_count"]
KINDS = SIMPLE_KINDS + ["bar_value", "table_date"]

_QUESTIONS = {
    "square_colour": "what colour is the square?",
    "bar_colour": "what colour is the tallest bar?",
    "bar_highest": "which bar is highest?",
    "bar_count": "how many bars are there?",
    "bar_value": "what is the value of bar {letter}?",
    "table_date": "what is the date in row {letter}?",
}
_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize_words(text: str) -> list[str]:
    """Split text into lowercase words and single punctuation marks (the vocabulary's unit).

    >>> tokenize_words("What colour is the square?")
    ['what', 'colour', 'is', 'the', 'square', '?']
    """
    return _WORD.findall(text.lower())


def _vocab() -> list[str]:
    texts = [q.format(letter=letter) for q in _QUESTIONS.values() for letter in LETTERS]
    texts += list(COLOURS) + list(LETTERS) + list(MONTHS) + [str(d) for d in range(1, 29)]
    return sorted({w for t in texts for w in tokenize_words(t)})


SYNTHETIC_VOCAB: list[str] = _vocab()

_WHITE = (255, 255, 255)
_INK = (30, 30, 30)


def _font(px: float) -> ImageFont.ImageFont:
    # Pillow's embedded font at a pixel size: no system font files, identical on every machine.
    return ImageFont.load_default(size=max(6, int(round(px))))


def _square(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    img = Image.new("RGB", (size, size), _WHITE)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    cell = rng.integers(4)
    side = int(size * 0.36)
    half = size // 2
    slack = max(half - side, 1)
    x0 = (cell % 2) * half + int(rng.integers(slack))
    y0 = (cell // 2) * half + int(rng.integers(slack))
    ImageDraw.Draw(img).rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=COLOURS[colour])
    return img, {"answer": colour}


def _bars(rng: np.random.Generator, size: int, n: int, distinct_colours: bool,
          print_values: bool) -> tuple[Image.Image, list[int], list[str]]:
    """A bar chart of ``n`` bars with distinct integer values 1..9, letter labels below."""
    values = [int(v) for v in rng.choice(np.arange(1, 10), size=n, replace=False)]
    names = list(COLOURS)
    if distinct_colours:
        colours = [names[k] for k in rng.permutation(len(names))[:n]]
    else:
        colours = [names[k] for k in rng.integers(len(names), size=n)]
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    font = _font(size * 0.15)
    left, right = int(size * 0.06), int(size * 0.96)
    base = int(size * 0.80)  # x axis; letters go below it
    top = int(size * (0.18 if print_values else 0.06))
    draw.line([left, base, right, base], fill=_INK, width=1)
    slot = (right - left) / n
    for k, (value, colour) in enumerate(zip(values, colours)):
        x0 = left + k * slot + slot * 0.15
        x1 = left + (k + 1) * slot - slot * 0.15
        y0 = base - (base - top) * value / 9
        draw.rectangle([int(x0), int(y0), int(x1), base - 1], fill=COLOURS[colour])
        centre = (x0 + x1) / 2
        draw.text((centre, base + 1), LETTERS[k], fill=_INK, font=font, anchor="mt")
        if print_values:
            draw.text((centre, y0 - 1), str(value), fill=_INK, font=font, anchor="mb")
    return img, values, colours


def _bar_colour(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    img, values, colours = _bars(rng, size, int(rng.integers(2, 5)), True, False)
    return img, {"answer": colours[int(np.argmax(values))]}


def _bar_highest(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    img, values, _ = _bars(rng, size, int(rng.integers(2, 5)), False, False)
    return img, {"answer": LETTERS[int(np.argmax(values))]}


def _bar_count(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    n = int(rng.integers(2, 7))
    img, _, _ = _bars(rng, size, n, False, False)
    return img, {"answer": str(n)}


def _bar_value(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    n = int(rng.integers(3, 6))
    img, values, _ = _bars(rng, size, n, False, True)
    k = int(rng.integers(n))
    return img, {"answer": str(values[k]), "letter": LETTERS[k]}


def _table_date(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    n = int(rng.integers(3, 5))
    dates = [f"{MONTHS[rng.integers(12)]} {int(rng.integers(1, 29))}" for _ in range(n)]
    img = Image.new("RGB", (size, size), _WHITE)
    draw = ImageDraw.Draw(img)
    line = size / (n + 1)
    col = int(size * 0.16)
    px = line * 0.7
    while px > 6 and max(_font(px).getlength(d) for d in dates) > size - col - 3:
        px -= 1  # the longest date must fit its column: the answer has to be readable
    font = _font(px)
    draw.rectangle([0, 0, size - 1, int(line)], fill=(225, 225, 225))  # header band
    draw.text((col + 2, line / 2), "date", fill=_INK, font=font, anchor="lm")
    for k, date in enumerate(dates):
        y = line * (k + 1)
        draw.line([0, int(y), size - 1, int(y)], fill=(160, 160, 160))
        draw.text((col / 2, y + line / 2), LETTERS[k], fill=_INK, font=font, anchor="mm")
        draw.text((col + 2, y + line / 2), date, fill=_INK, font=font, anchor="lm")
    draw.line([col, 0, col, size - 1], fill=(160, 160, 160))
    k = int(rng.integers(n))
    return img, {"answer": dates[k], "letter": LETTERS[k]}


_DRAW: dict[str, Callable[[np.random.Generator, int], tuple[Image.Image, dict[str, Any]]]] = {
    "square_colour": _square, "bar_colour": _bar_colour, "bar_highest": _bar_highest,
    "bar_count": _bar_count, "bar_value": _bar_value, "table_date": _table_date,
}


def check_kinds(kinds: list[str] | None) -> list[str]:
    """Validate kind names (None means every kind); raises ``ValueError`` naming a bad one."""
    if kinds is None:
        return list(KINDS)
    if not kinds:
        raise ValueError("synthetic kinds: the list is empty")
    for kind in kinds:
        if kind not in _DRAW:
            raise ValueError(f"synthetic kind {kind!r} is unknown; choose from {', '.join(KINDS)}")
    return list(kinds)


def make_sample(row: int, seed: int = 0, kinds: list[str] | None = None, image_size: int = 56,
                split: str = "train") -> dict[str, Any]:
    """Draw sample ``row`` of the stream ``(seed, split)``; independent of every other row.

    Parameters
    ----------
    row : int
        Row number (>= 0); part of the sample id ``synthetic/{split}/{row}``.
    seed : int
        Generation seed.
    kinds : list of str, optional
        Kinds to draw from (uniformly); None means :data:`KINDS`.
    image_size : int
        Side of the square RGB image in pixels (>= 16).
    split : str
        Stream name, so ``train`` and ``test`` rows differ for one seed.

    Returns
    -------
    dict
        ``index, sample_id, image, question, answer, answers, kind, subset``.

    Examples
    --------
    >>> a = make_sample(5, seed=1)
    >>> b = make_sample(5, seed=1)
    >>> a["question"] == b["question"] and a["image"].tobytes() == b["image"].tobytes()
    True
    """
    from capture.subsets import label_subset

    kinds = check_kinds(kinds)
    if image_size < 16:
        raise ValueError(f"synthetic image_size {image_size} is below 16 pixels")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(split.encode()), row])
    kind = kinds[int(rng.integers(len(kinds)))]
    image, info = _DRAW[kind](rng, image_size)
    question = _QUESTIONS[kind].format(letter=info.get("letter", ""))
    return {
        "index": row, "sample_id": f"synthetic/{split}/{row}", "image": image,
        "question": question, "answer": info["answer"], "answers": [info["answer"]],
        "kind": kind, "subset": label_subset("synthetic", question),
    }


def generate(n: int, seed: int = 0, kinds: list[str] | None = None, image_size: int = 56,
             split: str = "train") -> list[dict[str, Any]]:
    """``n`` synthetic samples (rows ``0..n-1`` of the stream ``(seed, split)``).

    Parameters
    ----------
    n : int
        Number of samples.
    seed, kinds, image_size, split
        As in :func:`make_sample`.

    Returns
    -------
    list of dict
        Records with keys ``index, sample_id, image (PIL RGB), question, answer, answers, kind,
        subset``.

    Examples
    --------
    >>> rows = generate(8, seed=3, kinds=SIMPLE_KINDS)
    >>> all(tokenize_words(r["answer"])[0] in SYNTHETIC_VOCAB for r in rows)
    True
    >>> rows[2]["sample_id"]
    'synthetic/train/2'
    """
    return list(iter_samples(range(n), seed, kinds, image_size, split))


def iter_samples(rows: Any, seed: int = 0, kinds: list[str] | None = None, image_size: int = 56,
                 split: str = "train") -> Iterator[dict[str, Any]]:
    """Lazily draw the given rows (any iterable of ints), e.g. one capture shard's rows.

    >>> [s["index"] for s in iter_samples([4, 0], seed=0)]
    [4, 0]
    """
    kinds = check_kinds(kinds)
    for row in rows:
        yield make_sample(int(row), seed, kinds, image_size, split)
