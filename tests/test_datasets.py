"""Offline loaders: every on-disk layout, the hub schemas, sampling, and every kind of bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import capture.datasets as cd
from capture.datasets import DataError, open_dataset, to_rgb
from schemas.config import ConfigError, DataConfig
from schemas.errors import GapError

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(mode: str = "RGB", size=(6, 4), colour=(10, 20, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


def image_cell(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def write_parquet(path: Path, columns: dict[str, list], types: dict[str, pa.DataType],
                  row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def chartqa_dir(root: Path, n: int = 7, split: str = "test") -> Path:
    write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", {
        "image": [image_cell(png(colour=(i, 0, 0))) for i in range(n)],
        "query": [f"What is the value of bar {i}?" for i in range(n)],
        "label": [[str(i * 10)] for i in range(n)],
        "human_or_machine": [0] * n,
    }, {"image": IMAGE_TYPE, "label": pa.list_(pa.string())})
    return root


def cfg(name: str, path: Path | None, **kw) -> DataConfig:
    return DataConfig(name=name, path=None if path is None else str(path), **kw)


# ----------------------------------------------------------------------------- layouts and schemas

def test_chartqa_parquet_random_access_across_row_groups(tmp_path):
    ds = open_dataset(cfg("chartqa", chartqa_dir(tmp_path)))
    assert len(ds) == 7
    # strided shard access (i % 3 == 1) crosses row groups of 2 rows, out of order too
    for i in [4, 1, 6]:
        s = ds[i]
        assert s["sample_id"] == f"chartqa/test/{i}" and s["index"] == i
        assert s["question"] == f"What is the value of bar {i}?"
        assert s["answer"] == str(i * 10) and s["answers"] == [str(i * 10)]
        assert s["image"].getpixel((0, 0)) == (i, 0, 0)
        assert s["subset"] == "hard"  # ChartQA with no easy cue
    assert ds.sample_id(5) == "chartqa/test/5"


def test_docvqa_config_directory_and_hidden_test_answers(tmp_path):
    types = {"image": IMAGE_TYPE, "answers": pa.list_(pa.string())}
    for config in ("DocVQA", "InfographicVQA"):
        write_parquet(tmp_path / config / "validation-00000-of-00001.parquet", {
            "image": [image_cell(png())] * 3, "question": [f"{config} q{i}" for i in range(3)],
            "answers": [["a1", "a2"], ["b"], ["c"]]}, types)
        write_parquet(tmp_path / config / "test-00000-of-00001.parquet", {
            "image": [image_cell(png())] * 2, "question": ["q", "q"], "answers": [None, None]},
            types)
    ds = open_dataset(cfg("docvqa", tmp_path, split="validation"))  # config DocVQA by default
    assert ds[0]["question"] == "DocVQA q0" and ds[0]["answers"] == ["a1", "a2"]
    info = open_dataset(cfg("docvqa", tmp_path, split="validation", config_name="InfographicVQA"))
    assert info[2]["question"] == "InfographicVQA q2"
    with pytest.raises(ConfigError, match="no gold answers.*data.split=validation"):
        open_dataset(cfg("docvqa", tmp_path, split="test"))
    # a copy that stores the hidden answers as empty lists instead of nulls is refused alike
    write_parquet(tmp_path / "empty" / "test-00000-of-00001.parquet", {
        "image": [image_cell(png())] * 3, "question": ["q"] * 3, "answers": [[], [], None]}, types)
    with pytest.raises(ConfigError, match="no gold answers.*data.split=validation"):
        open_dataset(cfg("docvqa", tmp_path / "empty", split="test"))
    # one empty list among real answers is that sample's data error, not the split's
    write_parquet(tmp_path / "some" / "validation-00000-of-00001.parquet", {
        "image": [image_cell(png())] * 2, "question": ["q"] * 2, "answers": [["a"], []]}, types)
    some = open_dataset(cfg("docvqa", tmp_path / "some", split="validation"))
    assert some[0]["answers"] == ["a"]
    with pytest.raises(DataError, match=r"^docvqa/validation/1: no gold answers"):
        some[1]


def test_textvqa_teacher_answer_is_most_frequent(tmp_path):
    answers = [["nike"] * 3 + ["adidas"] * 6 + ["puma"], ["b", "a", "a", "b"]]
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", {
        "image": [image_cell(png())] * 2, "question": ["what brand?", "which?"],
        "answers": answers}, {"image": IMAGE_TYPE})
    ds = open_dataset(cfg("textvqa", tmp_path, split="validation"))
    assert ds[0]["answer"] == "adidas" and len(ds[0]["answers"]) == 10
    assert ds[1]["answer"] == "b"  # a tie keeps the first of the tied answers
    assert ds[0]["subset"] == "medium"


def test_vqav2_answer_dicts(tmp_path):
    answer_type = pa.list_(pa.struct([("answer", pa.string()), ("answer_id", pa.int64())]))
    write_parquet(tmp_path / "validation.parquet", {
        "image": [image_cell(png())], "question": ["What color is the bus?"],
        "answers": [[{"answer": "red", "answer_id": 1}, {"answer": "red", "answer_id": 2},
                     {"answer": "maroon", "answer_id": 3}]]},
        {"image": IMAGE_TYPE, "answers": answer_type})
    s = open_dataset(cfg("vqav2", tmp_path, split="validation"))[0]
    assert s["answers"] == ["red", "red", "maroon"] and s["answer"] == "red"
    assert s["subset"] == "easy"


def test_scienceqa_subset_is_the_questions_and_an_empty_choice_is_refused(tmp_path):
    # the options appended to the prompt must not change the hard/easy label of the question
    q = "Is the air temperature going up or down?"
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "image": [image_cell(png())] * 4, "question": [q, q, q, q],
        "choices": [["up", "down"], ["higher", "lower"], ["the table", "the chair"], ["", "cat", "dog"]],
        "answer": [0, 1, 0, 1],
    }, {"image": IMAGE_TYPE})
    ds = open_dataset(cfg("scienceqa", tmp_path))
    from capture.subsets import label_subset

    assert [ds[i]["subset"] for i in range(3)] == [label_subset("scienceqa", q, ds.subset_mode)] * 3
    with pytest.raises(DataError, match=r"scienceqa/test/3: an empty choice"):
        ds[3]


def test_scienceqa_hint_is_the_context_before_the_question(tmp_path):
    # LLaVA's CQM order: "Context: <hint>" line, the question, the lettered options; an empty
    # hint adds no line; the subset label reads the question only (a hint with easy cues in it
    # does not make the question easy)
    q = "Which word does not rhyme?"
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "image": [image_cell(png())] * 3, "question": [q] * 3,
        "choices": [["cat", "hat", "dog"]] * 3, "answer": [2, 2, 2],
        "hint": ["  Look at the picture: what color is the hat?  ", "", None],
    }, {"image": IMAGE_TYPE})
    ds = open_dataset(cfg("scienceqa", tmp_path))
    from capture.subsets import label_subset

    assert ds[0]["question"] == ("Context: Look at the picture: what color is the hat?\n"
                                 "Which word does not rhyme?\nOptions: (A) cat (B) hat (C) dog")
    assert ds[1]["question"] == ds[2]["question"] == "Which word does not rhyme?\nOptions: (A) cat (B) hat (C) dog"
    assert label_subset("scienceqa", "Look at the picture: what color is the hat?", ds.subset_mode) == "easy"
    assert [ds[i]["subset"] for i in range(3)] == [label_subset("scienceqa", q, ds.subset_mode)] * 3 == ["medium"] * 3
    assert "asked" not in ds[0]


def test_scienceqa_text_only_rows_left_out_with_stable_ids(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "image": [image_cell(png()), None, image_cell(png()), None, image_cell(png())],
        "question": [f"q{i}" for i in range(5)],
        "choices": [["mercury", "venus"], ["x", "y"], ["a", "b", "c"], ["p"], ["u", "v"]],
        "answer": [1, 0, 2, 0, 5],
    }, {"image": IMAGE_TYPE})
    ds = open_dataset(cfg("scienceqa", tmp_path))
    assert len(ds) == 3 and [ds.sample_id(i) for i in range(3)] == [
        "scienceqa/test/0", "scienceqa/test/2", "scienceqa/test/4"]
    s = ds[0]
    assert s["answer"] == "venus" and s["answers"] == ["venus", "B"]  # the teacher-forced answer is the text
    assert s["question"] == "q0\nOptions: (A) mercury (B) venus"
    assert ds[1]["answer"] == "c"
    with pytest.raises(DataError, match=r"scienceqa/test/4: answer index 5 .* 2 choices"):
        ds[2]


def test_arrow_save_to_disk_layout(tmp_path):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                               "label": datasets.List(datasets.Value("string"))})
    rows = {"image": [Image.new("RGB", (5, 5), (0, k, 0)) for k in range(4)],
            "query": [f"q{k}" for k in range(4)], "label": [[f"{k}"] for k in range(4)]}
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = open_dataset(cfg("chartqa", tmp_path / "saved", limit=3))
    assert len(ds) == 3
    assert ds[2]["image"].getpixel((1, 1)) == (0, 2, 0) and ds[2]["answer"] == "2"


def test_imagefolder_layout(tmp_path, monkeypatch):
    split = tmp_path / "test"
    split.mkdir()
    lines = []
    for k in range(3):
        Image.new("RGB", (4, 4), (0, 0, 50 * k)).save(split / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "query": f"q{k}", "label": [str(k)]}))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = open_dataset(cfg("chartqa", tmp_path))
    assert ds[2]["image"].getpixel((0, 0)) == (0, 0, 100) and ds[2]["answers"] == ["2"]
    monkeypatch.chdir(tmp_path.parent)  # a relative data.path finds the images too
    relative = open_dataset(cfg("chartqa", Path(tmp_path.name)))
    assert relative[1]["image"].getpixel((0, 0)) == (0, 0, 50)
    (split / "2.png").unlink()
    with pytest.raises(DataError, match="chartqa/test/2: image file not found"):
        ds[2]


def test_hf_hub_cache_snapshot(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "datasets--HuggingFaceM4--ChartQA"
    chartqa_dir(repo / "snapshots" / "abc123", n=3)
    chartqa_dir(repo / "snapshots" / "old999", n=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert len(open_dataset(cfg("chartqa", None))) == 3
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not in the HF hub cache.*gap data stage chartqa"):
        open_dataset(cfg("chartqa", None))


def test_synthetic_through_open_dataset():
    ds = open_dataset(DataConfig(name="synthetic", limit=5, seed=3, config_name="bar_count"))
    assert len(ds) == 5 and {ds[i]["question"] for i in range(5)} == {"how many bars are there?"}
    assert ds[4]["sample_id"] == "synthetic/test/4"
    assert len(open_dataset(DataConfig(name="synthetic"))) == cd.SYNTHETIC_DEFAULT_ROWS
    with pytest.raises(ConfigError, match="data.config_name 'pie'"):
        open_dataset(DataConfig(name="synthetic", config_name="pie"))


# ----------------------------------------------------------------------------- sampling

def test_limit_and_seeded_sampling(tmp_path):
    root = chartqa_dir(tmp_path, n=40)
    assert [open_dataset(cfg("chartqa", root, limit=4)).sample_id(i) for i in range(4)] == [
        f"chartqa/test/{i}" for i in range(4)]
    a = open_dataset(cfg("chartqa", root, limit=6, shuffle=True, seed=1))
    b = open_dataset(cfg("chartqa", root, limit=6, shuffle=True, seed=1))
    c = open_dataset(cfg("chartqa", root, limit=6, shuffle=True, seed=2))
    assert a.rows.tolist() == b.rows.tolist() != c.rows.tolist()
    assert len(set(a.rows.tolist())) == 6 and a.rows.tolist() == sorted(a.rows.tolist())
    expected = np.sort(np.random.default_rng(1).choice(40, 6, replace=False))
    assert a.rows.tolist() == expected.tolist()
    s = a[3]  # the sample keeps its source row in the id, whatever selected it
    assert s["sample_id"] == f"chartqa/test/{a.rows[3]}" and s["answer"] == str(a.rows[3] * 10)
    assert len(open_dataset(cfg("chartqa", root, limit=0))) == 0
    assert len(open_dataset(cfg("chartqa", root, limit=100, shuffle=True))) == 40


def test_subset_mode_overrides_keywords(tmp_path):
    root = chartqa_dir(tmp_path, n=2)
    assert open_dataset(cfg("chartqa", root, subset="all_easy"))[0]["subset"] == "easy"


# ----------------------------------------------------------------------------- bad samples

def test_bad_samples_are_errors_and_the_rest_goes_on(tmp_path):
    good = image_cell(png())
    truncated = png(size=(64, 64))[:60]
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "image": [good, image_cell(b"not an image"), image_cell(truncated), good, good, good,
                  None, good],
        "query": ["ok", "q", "q", "   ", "q", "q", "q", "ok again"],
        "label": [["1"], ["1"], ["1"], ["1"], [], ["", "  "], ["1"], ["2"]],
    }, {"image": IMAGE_TYPE, "label": pa.list_(pa.string())})
    ds = open_dataset(cfg("chartqa", tmp_path))
    out = list(ds.iter_indices(range(len(ds))))
    ok = [s["sample_id"] for s in out if isinstance(s, dict)]
    assert ok == ["chartqa/test/0", "chartqa/test/7"]
    errors = {e.index: str(e) for e in out if isinstance(e, DataError)}
    assert errors[1].startswith("chartqa/test/1: image is not readable")
    assert errors[2].startswith("chartqa/test/2: image is not readable")
    assert errors[3] == "chartqa/test/3: empty question"
    assert errors[4] == errors[5].replace("/5", "/4") == \
        "chartqa/test/4: no gold answers (missing or empty answer list)"
    assert errors[6] == "chartqa/test/6: no image"
    assert all("\n" not in e for e in errors.values())
    with pytest.raises(GapError, match="requested twice"):
        list(ds.iter_indices([0, 7, 0]))


def test_duplicate_source_rows_get_distinct_ids(tmp_path):
    write_parquet(tmp_path / "test.parquet", {
        "image": [image_cell(png())] * 3, "query": ["same"] * 3, "label": [["x"]] * 3},
        {"image": IMAGE_TYPE})
    ds = open_dataset(cfg("chartqa", tmp_path))
    assert len({ds[i]["sample_id"] for i in range(3)}) == 3


@pytest.mark.parametrize("mode,colour,expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("RGBA", (200, 0, 0, 0), (255, 255, 255)),        # fully transparent -> the white page
    ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
    ("LA", (0, 128), (127, 127, 127)),                 # half-transparent black over white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("P", 0, (0, 0, 0)),
])
def test_image_modes_become_rgb(mode, colour, expected):
    data = png(mode, (3, 3), colour, fmt="TIFF" if mode == "CMYK" else "PNG")
    im = to_rgb({"bytes": data, "path": None}, "x/test/0")
    assert im.mode == "RGB"
    assert tuple(int(v) for v in im.getpixel((1, 1))) == pytest.approx(expected, abs=1)


def test_palette_with_transparency_and_16_bit():
    pal = Image.new("P", (2, 2), 3)
    pal.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 90, 0, 0] + [0] * 756)
    pal.info["transparency"] = 3
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=3)
    assert to_rgb(buf.getvalue(), "x/test/1").getpixel((0, 0)) == (255, 255, 255)
    for value, expected in [(65535, 255), (32896, 128), (0, 0)]:
        arr = np.full((2, 2), value, dtype=np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")  # a 16-bit grayscale PNG
        im = to_rgb(buf.getvalue(), "x/test/2")
        assert im.getpixel((0, 0)) == (expected,) * 3, value


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 200, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert to_rgb(buf.getvalue(), "x/test/0").size == (2, 4)


def test_decompression_bomb_guard(monkeypatch):
    data = png(size=(40, 30))
    monkeypatch.setattr(cd, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"^docvqa/validation/9: image is 40x30 .*decompression"):
        to_rgb(data, "docvqa/validation/9")
    monkeypatch.setattr(cd, "MAX_IMAGE_PIXELS", 1200)
    assert to_rgb(data, "docvqa/validation/9").size == (40, 30)


# ----------------------------------------------------------------------------- configuration errors

def test_configuration_errors_name_the_key_or_path(tmp_path):
    root = chartqa_dir(tmp_path / "c")
    chartqa_dir(tmp_path / "c", split="val")
    with pytest.raises(ConfigError, match=r"data.split 'tset' not found under .*; found: test, val"):
        open_dataset(cfg("chartqa", root, split="tset"))
    with pytest.raises(ConfigError, match=r"data.path .*nowhere does not exist"):
        open_dataset(cfg("chartqa", tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    with pytest.raises(ConfigError, match=r"data.path .*empty: no parquet, Arrow or imagefolder"):
        open_dataset(cfg("chartqa", tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        open_dataset(cfg("chartqa", tmp_path / "file.txt"))
    write_parquet(tmp_path / "nolabel" / "test.parquet",
                  {"image": [image_cell(png())], "query": ["q"]}, {"image": IMAGE_TYPE})
    with pytest.raises(ConfigError, match=r"no column\(s\) label expected for chartqa"):
        open_dataset(cfg("chartqa", tmp_path / "nolabel"))
    # a later shard of the split lacking the column is named at open, not per sample
    chartqa_dir(tmp_path / "shards")
    (tmp_path / "shards" / "data" / "test-00000-of-00001.parquet").rename(
        tmp_path / "shards" / "data" / "test-00000-of-00002.parquet")
    write_parquet(tmp_path / "shards" / "data" / "test-00001-of-00002.parquet",
                  {"image": [image_cell(png())], "query": ["q"]}, {"image": IMAGE_TYPE})
    with pytest.raises(ConfigError, match=r"no column\(s\) label expected for chartqa"):
        open_dataset(cfg("chartqa", tmp_path / "shards"))


def test_split_in_several_directories_is_ambiguous(tmp_path):
    chartqa_dir(tmp_path / "a")
    chartqa_dir(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"split 'test' is in several directories \(a/data, b/data\)"):
        open_dataset(cfg("chartqa", tmp_path))


def test_split_names_from_file_names():
    assert cd.split_of(Path("x/validation-00003-of-00010.parquet")) == "validation"
    assert cd.split_of(Path("DocVQA/partial-test/0000.parquet")) == "test"
    assert cd.split_of(Path("cache/chart_qa-val-00000-of-00002.arrow")) == "val"
    assert cd.split_of(Path("train.parquet")) == "train"


def test_two_threads_read_one_parquet_split(tmp_path, monkeypatch):
    # capture reads its shard on one thread and swap donors on another; pyarrow's ParquetFile is
    # not thread-safe (crashes, or good rows read as damaged): reads must never overlap, and a
    # donor read must not evict the shard thread's row group
    import threading
    import time

    ds = open_dataset(cfg("chartqa", chartqa_dir(tmp_path, n=40)))
    real, inside, overlaps, reads = pq.ParquetFile.read_row_group, [0], [0], []

    def read_row_group(self, *args, **kwargs):
        inside[0] += 1
        overlaps[0] += inside[0] > 1
        time.sleep(0.002)  # widen the window two unlocked readers would share
        reads.append(threading.current_thread().name)
        inside[0] -= 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    wrong = []

    def check(s):
        if isinstance(s, Exception) or s["answer"] != str(s["index"] * 10):
            wrong.append(s)

    def shard():
        for s in ds.iter_indices(range(40)):
            check(s)

    def donors():
        for i in range(40):
            check(ds[(i * 7 + 3) % 40])

    threads = [threading.Thread(target=shard, name="shard"), threading.Thread(target=donors, name="donors")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and overlaps[0] == 0
    assert reads.count("shard") == 20  # 40 rows in groups of 2: each group read once by the shard


def test_damaged_row_group_fails_only_its_samples(tmp_path, monkeypatch):
    ds = open_dataset(cfg("chartqa", chartqa_dir(tmp_path, n=4)))
    real = pq.ParquetFile.read_row_group

    def damaged(self, i, *args, **kwargs):
        if i == 1:
            raise OSError("Corrupt snappy compressed data.\nmore detail")
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", damaged)
    out = list(ds.iter_indices(range(4)))
    assert [isinstance(s, dict) for s in out] == [True, True, False, False]
    assert str(out[2]) == (f"chartqa/test/2: row not readable from {ds_file(tmp_path)} "
                           "(Corrupt snappy compressed data.)")


def ds_file(root: Path) -> Path:
    """The one parquet file of :func:`chartqa_dir`'s test split."""
    return root / "data" / "test-00000-of-00001.parquet"


def test_a_truncated_parquet_file_is_named_at_open(tmp_path):
    path = ds_file(chartqa_dir(tmp_path))
    path.write_bytes(path.read_bytes()[:500])  # a copy that stopped half way
    with pytest.raises(ConfigError) as err:
        open_dataset(cfg("chartqa", tmp_path))
    assert str(err.value) == (f"data.path: {path}: not a readable parquet file "
                              "(Parquet magic bytes not found in footer)")


def test_a_truncated_arrow_file_is_named_at_open(tmp_path):
    path = tmp_path / "test" / "data-00000-of-00001.arrow"
    path.parent.mkdir()
    table = pa.table({"image": [image_cell(png())] * 50, "query": ["q"] * 50, "label": [["1"]] * 50},
                     schema=pa.schema([("image", IMAGE_TYPE), ("query", pa.string()),
                                       ("label", pa.list_(pa.string()))]))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ConfigError) as err:
        open_dataset(cfg("chartqa", tmp_path))
    assert str(err.value).startswith(f"data.path: {path}: not a readable Arrow file (")
    assert "\n" not in str(err.value)


def test_an_unreadable_image_file_is_named(tmp_path):
    split = tmp_path / "test"
    split.mkdir()
    (split / "0.png").write_bytes(png(size=(64, 64))[:60])  # truncated on disk
    (split / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "query": "q", "label": ["1"]}))
    with pytest.raises(DataError) as err:
        open_dataset(cfg("chartqa", tmp_path))[0]
    assert str(err.value).startswith(f"chartqa/test/0: image {split / '0.png'} is not readable (")
    (split / "0.png").unlink()
    with pytest.raises(DataError) as err:
        open_dataset(cfg("chartqa", tmp_path))[0]
    assert str(err.value) == f"chartqa/test/0: image file not found: {split / '0.png'}"


# ----------------------------------------------------------------------------- review cases

def test_vqa_teacher_forced_answer_is_the_largest_group_as_the_evaluator_counts(tmp_path):
    # "Nokia" four times in four spellings beats "lg" three times; blank answers stay counted
    answers = ["Nokia", "nokia", "NOKIA", "Nokia.", "samsung", "samsung", "lg", "lg", "lg", ""]
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", {
        "image": [image_cell(png())], "question": ["which brand?"], "answers": [answers]},
        {"image": IMAGE_TYPE, "answers": pa.list_(pa.string())})
    s = open_dataset(cfg("textvqa", tmp_path, split="validation"))[0]
    assert s["answer"] == "Nokia" and s["answers"] == answers  # 10 human answers, as scored
    # ChartQA's labels are not VQA-normalised: exact strings count
    write_parquet(tmp_path / "c" / "data" / "test-00000-of-00001.parquet", {
        "image": [image_cell(png())], "query": ["value?"], "label": [["The 5", "5", "the 5"]]},
        {"image": IMAGE_TYPE, "label": pa.list_(pa.string())})
    assert open_dataset(cfg("chartqa", tmp_path / "c"))[0]["answer"] == "The 5"


def _damage_column(path: Path, group: int, column: str) -> None:
    """Flip bytes of one column chunk's first page header (the page no longer decodes)."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    for j in range(start, start + 6):
        raw[j] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name,column", [("chartqa", "label.list.element"), ("scienceqa", "image.path")])
def test_a_damaged_column_read_at_open_fails_only_its_rows(tmp_path, name, column):
    n = 12
    images = [image_cell(png(colour=(k, 0, 0))) for k in range(n)]
    if name == "chartqa":
        columns = {"image": images, "query": [f"q{k}?" for k in range(n)], "label": [[str(k)] for k in range(n)]}
        types = {"image": IMAGE_TYPE, "label": pa.list_(pa.string())}
    else:
        columns = {"image": images, "question": [f"q{k}?" for k in range(n)], "choices": [["a", "b"]] * n,
                   "answer": [0] * n}
        types = {"image": IMAGE_TYPE, "choices": pa.list_(pa.string())}
    path = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", columns, types, row_group_size=4)
    _damage_column(path, 2, column)
    ds = open_dataset(cfg(name, tmp_path))
    got = ["err" if isinstance(s, DataError) else "ok" for s in ds.iter_indices(range(len(ds)))]
    assert got == ["ok"] * 8 + ["err"] * 4


def test_an_image_value_that_is_no_path_or_bytes_fails_its_sample_only(tmp_path):
    (tmp_path / "test").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "a.png")
    lines = [{"file_name": "a.png", "query": "q0", "label": ["1"]},
             {"file_name": 5, "query": "q1", "label": ["2"]},
             {"file_name": "a.png", "query": "q2", "label": ["3"]}]
    (tmp_path / "test" / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    got = list(open_dataset(cfg("chartqa", tmp_path)).iter_indices(range(3)))
    assert [isinstance(s, DataError) for s in got] == [False, True, False]
    assert "image value of type int is neither a file path nor image bytes" in str(got[1])


def test_hard_cues_belong_to_the_chart_and_document_datasets():
    from capture.subsets import label_subset

    assert label_subset("vqav2", "What color is the table?") == "easy"
    assert label_subset("vqav2", "How many people are there?") == "easy"  # VQAv2's own level
    assert label_subset("scienceqa", "Which of these states is farthest north?") == "medium"
    assert label_subset("textvqa", "What is the date on the sign?") == "medium"
    assert label_subset("docvqa", "What is the date on the letter?") == "hard"
    assert label_subset("chartqa", "Which bar is the highest?") == "hard"
