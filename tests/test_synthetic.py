"""The synthetic set: determinism, exact answers checked against the pixels, the vocabulary."""

from __future__ import annotations

import re

import numpy as np
import pytest

from capture.synthetic import (COLOURS, KINDS, LETTERS, MONTHS, SIMPLE_KINDS, SYNTHETIC_VOCAB,
                               generate, make_sample, tokenize_words)

SIZE = 112  # large enough that bar geometry is unambiguous at the pixel level


def _palette_masks(img) -> dict[str, np.ndarray]:
    arr = np.asarray(img)
    return {name: np.all(arr == rgb, axis=-1) for name, rgb in COLOURS.items()}


def _bars(img) -> list[tuple[int, str]]:
    """Independent reading of a bar chart: (top row, colour) of each bar, left to right."""
    masks = _palette_masks(img)
    any_bar = np.any(np.stack(list(masks.values())), axis=0)
    row = int(SIZE * 0.80) - 2  # just above the x axis, where every bar is present
    cols = np.flatnonzero(any_bar[row])
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    bars = []
    for run in runs:
        mid = int(run[len(run) // 2])
        top = int(np.flatnonzero(any_bar[:, mid])[0])
        colour = next(name for name, m in masks.items() if m[row, mid])
        bars.append((top, colour))
    return bars


def test_determinism_and_row_independence():
    a = generate(12, seed=7)
    b = generate(12, seed=7)
    assert [s["question"] for s in a] == [s["question"] for s in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    # Row i does not depend on how many rows were asked for (shards draw only their rows).
    assert make_sample(9, seed=7)["image"].tobytes() == a[9]["image"].tobytes()
    other = generate(12, seed=8)
    assert any(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, other))
    test_split = generate(12, seed=7, split="test")
    assert any(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, test_split))
    assert test_split[3]["sample_id"] == "synthetic/test/3"


def test_record_shape():
    for s in generate(10, seed=1, image_size=40):
        assert set(s) == {"index", "sample_id", "image", "question", "answer", "answers", "kind",
                          "subset"}
        assert s["image"].mode == "RGB" and s["image"].size == (40, 40)
        assert s["answers"] == [s["answer"]] and s["kind"] in KINDS


@pytest.mark.parametrize("kind", ["square_colour", "bar_colour", "bar_highest", "bar_count",
                                  "bar_value"])
def test_answers_match_pixels(kind):
    for s in generate(25, seed=3, kinds=[kind], image_size=SIZE):
        img = s["image"]
        if kind == "square_colour":
            present = [name for name, m in _palette_masks(img).items() if m.any()]
            assert present == [s["answer"]]
            continue
        bars = _bars(img)
        tops = [top for top, _ in bars]
        if kind == "bar_colour":
            assert len({c for _, c in bars}) == len(bars)  # colours are distinct
            assert bars[int(np.argmin(tops))][1] == s["answer"]
        elif kind == "bar_highest":
            assert LETTERS[int(np.argmin(tops))] == s["answer"]
        elif kind == "bar_count":
            assert str(len(bars)) == s["answer"]
        else:
            k = LETTERS.index(re.search(r"bar (\w)\?", s["question"]).group(1))
            base, top = int(SIZE * 0.80), int(SIZE * 0.18)
            assert round((base - tops[k]) * 9 / (base - top)) == int(s["answer"])


def test_table_dates():
    for s in generate(20, seed=4, kinds=["table_date"]):
        month, day = s["answer"].split()
        assert month in MONTHS and 1 <= int(day) <= 28
        assert re.fullmatch(r"what is the date in row [a-d]\?", s["question"])


def test_simple_kinds_closed_answer_sets():
    rows = generate(200, seed=0, kinds=SIMPLE_KINDS)
    by_kind: dict[str, set[str]] = {}
    for s in rows:
        by_kind.setdefault(s["kind"], set()).add(s["answer"])
    assert by_kind["square_colour"] == set(COLOURS)
    assert by_kind["bar_colour"] == set(COLOURS)
    assert by_kind["bar_highest"] <= set("abcd") and len(by_kind["bar_highest"]) == 4
    assert by_kind["bar_count"] == {"2", "3", "4", "5", "6"}


def test_vocab_covers_every_question_and_answer():
    assert SYNTHETIC_VOCAB == sorted(set(SYNTHETIC_VOCAB))
    assert all(w == w.lower() for w in SYNTHETIC_VOCAB)
    vocab = set(SYNTHETIC_VOCAB)
    for s in generate(300, seed=11):
        assert set(tokenize_words(s["question"])) <= vocab, s["question"]
        assert set(tokenize_words(s["answer"])) <= vocab, s["answer"]
    assert tokenize_words("Which bar is highest?") == ["which", "bar", "is", "highest", "?"]


def test_subsets_and_bad_arguments():
    labels = {s["kind"]: s["subset"] for s in generate(60, seed=2)}
    assert labels["square_colour"] == "easy"
    assert {labels[k] for k in KINDS if k != "square_colour"} == {"hard"}
    with pytest.raises(ValueError, match="unknown"):
        generate(1, kinds=["pie_chart"])
    with pytest.raises(ValueError, match="empty"):
        generate(1, kinds=[])
    with pytest.raises(ValueError, match="16 pixels"):
        generate(1, image_size=8)
