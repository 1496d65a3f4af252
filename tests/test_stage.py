"""`gap data stage` against a local fake hub: layout, manifest, checksums, and the loaders on it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

import gap
from capture.datasets import open_dataset
from capture.stage import stage, verify
from schemas.config import DataConfig
from schemas.errors import GapError


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def fake_hub(root: Path, splits: dict[str, int], subdir: str = "data", question: str = "query",
             answers: str = "label") -> Path:
    """A hub-like dataset repo written by `datasets` itself (Image feature, parquet shards)."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), question: datasets.Value("string"),
                               answers: datasets.List(datasets.Value("string"))})
    for split, n in splits.items():
        rows = {"image": [Image.new("RGB", (6, 5), (k, 100, 0)) for k in range(n)],
                question: [f"{split} question {k}" for k in range(n)],
                answers: [[f"{k}"] for k in range(n)]}
        ds = datasets.Dataset.from_dict(rows, features=feats)
        (root / subdir).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / subdir / f"{split}-00000-of-00001.parquet"))
    return root


def test_stage_writes_layout_manifest_and_loaders_read_it(tmp_path):
    src = fake_hub(tmp_path / "hub", {"test": 9, "val": 3})
    out = tmp_path / "staged"
    manifest = stage("chartqa", out, source=str(src), rows_per_group=4)
    assert list(manifest["splits"]) == ["test"]  # chartqa's default split
    entry = manifest["splits"]["test"]
    assert entry["rows"] == 9
    (file_info,) = entry["files"]
    path = out / file_info["path"]
    assert file_info["path"] == "data/test-00000-of-00001.parquet"
    assert file_info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_info["bytes"] == path.stat().st_size
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 9 and meta.num_row_groups == 3  # rows_per_group=4: 4 + 4 + 1
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert verify(out) == []

    ds = open_dataset(DataConfig(name="chartqa", path=str(out), split="test"))
    s = ds[5]
    assert s["sample_id"] == "chartqa/test/5" and s["question"] == "test question 5"
    assert s["answers"] == ["5"] and s["image"].getpixel((0, 0)) == (5, 100, 0)

    # staging another split later adds it to the same manifest
    stage("chartqa", out, splits=["val"], source=str(src), revision="v2")
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert set(splits) == {"test", "val"}
    # each split keeps its own source; the top level tells only the latest staging
    assert (splits["test"]["revision"], splits["val"]["revision"]) == (None, "v2")
    assert len(open_dataset(DataConfig(name="chartqa", path=str(out), split="val"))) == 3


def test_stage_shards_limit_and_config_subdirectory(tmp_path):
    src = fake_hub(tmp_path / "hub", {"validation": 10}, subdir="DocVQA", question="question",
                   answers="answers")
    out = tmp_path / "staged"
    # docvqa's default config DocVQA is the repo's sub-directory; limit 7, tiny shards
    manifest = stage("docvqa", out, source=str(src), limit=7, max_shard_bytes=100)
    assert manifest["config"] == "DocVQA" and manifest["splits"]["validation"]["config"] == "DocVQA"
    files = manifest["splits"]["validation"]["files"]
    assert manifest["splits"]["validation"]["rows"] == 7 and len(files) == 7
    assert sum(f["rows"] for f in files) == 7
    ds = open_dataset(DataConfig(name="docvqa", path=str(out), split="validation"))
    assert [ds[i]["question"] for i in range(7)] == [f"validation question {k}" for k in range(7)]
    assert ds[6]["sample_id"] == "docvqa/validation/6" and ds[6]["answers"] == ["6"]
    # restaging with fewer shards leaves no stale shard behind
    stage("docvqa", out, source=str(src), limit=7)
    assert len(list((out / "data").glob("validation-*.parquet"))) == 1
    assert verify(out) == []


def test_a_staging_that_stops_half_way_leaves_the_old_split_and_a_partial_one_is_refused(tmp_path, monkeypatch):
    import datasets

    from schemas.config import ConfigError

    src = fake_hub(tmp_path / "hub", {"test": 10})
    out = tmp_path / "staged"
    stage("chartqa", out, source=str(src), max_shard_bytes=150)
    n_files = len(list((out / "data").glob("test-*.parquet")))
    assert n_files > 3
    real, calls = datasets.Dataset.to_parquet, []

    def dies_on_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job killed mid-staging
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        stage("chartqa", out, source=str(src), max_shard_bytes=150)
    monkeypatch.setattr(datasets.Dataset, "to_parquet", real)
    assert verify(out) == [] and len(open_dataset(DataConfig(name="chartqa", path=str(out), split="test"))) == 10
    # files of a split that are not all there are refused, not read as a smaller split
    next((out / "data").glob("test-00001-*.parquet")).unlink()
    with pytest.raises(ConfigError, match=rf"data.split 'test' .* incomplete: {n_files - 1} file\(s\) for {n_files} "
                                          r"\(missing \[1\]\); stage it again"):
        open_dataset(DataConfig(name="chartqa", path=str(out), split="test"))


def test_hub_file_names_with_a_content_hash_are_read(tmp_path):
    # HuggingFaceM4/ChartQA names its files data/test-00000-of-00001-e2cd0b7a0f9eb20d.parquet
    src = fake_hub(tmp_path / "hub", {"test": 3, "val": 2})
    for path in (src / "data").glob("*.parquet"):
        path.rename(path.with_name(f"{path.stem}-e2cd0b7a0f9eb20d.parquet"))
    assert len(open_dataset(DataConfig(name="chartqa", path=str(src), split="val"))) == 2
    assert open_dataset(DataConfig(name="chartqa", path=str(src), split="test"))[2]["answers"] == ["2"]


def test_verify_detects_damage(tmp_path):
    out = tmp_path / "staged"
    stage("chartqa", out, source=str(fake_hub(tmp_path / "hub", {"test": 4})))
    path = next((out / "data").glob("*.parquet"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify(out) == [f"{path}: sha256 differs from the manifest",
                           "split test: 0 rows readable, manifest says 4"]
    path.unlink()
    assert verify(out)[0] == f"{path}: missing (split test)"
    assert gap.main(["data", "verify", str(out)]) == 1


def test_stage_errors(tmp_path, capsys):
    src = fake_hub(tmp_path / "hub", {"test": 2})
    with pytest.raises(GapError, match=r"chartqa: split 'nope' does not exist"):
        stage("chartqa", tmp_path / "o1", splits=["nope"], source=str(src))
    stage("chartqa", tmp_path / "o2", source=str(src))
    with pytest.raises(GapError, match="belongs to dataset 'chartqa', not 'textvqa'"):
        stage("textvqa", tmp_path / "o2", source=str(src))
    # through the dispatcher: a one-line error and a non-zero exit, never a traceback
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    code = gap.main(["data", "stage", "chartqa", "--to", str(tmp_path / "o3"),
                     "--source", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"gap data: error: chartqa: cannot load {tmp_path / 'empty'} split 'test' "
        f"(EmptyDatasetError: The directory at {tmp_path / 'empty'} doesn't contain any data files)")


def test_cli_stage_and_verify(tmp_path, capsys):
    src = fake_hub(tmp_path / "hub", {"test": 3})
    out = tmp_path / "staged"
    assert gap.main(["data", "stage", "chartqa", "--to", str(out), "--source", str(src),
                     "--limit", "2"]) == 0
    assert f"{out}: test 2 rows in 1 file(s)" in capsys.readouterr().out
    assert gap.main(["data", "verify", str(out)]) == 0
    with pytest.raises(SystemExit):
        gap.main(["data", "stage", "mnist", "--to", str(out)])


def test_image_files_are_embedded_not_referenced(tmp_path):
    import shutil

    src = tmp_path / "imagefolder"
    (src / "test").mkdir(parents=True)
    lines = []
    for k in range(3):
        Image.new("RGB", (4, 4), (0, 0, 40 * k)).save(src / "test" / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "query": f"q{k}", "label": [str(k)]}))
    (src / "test" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "staged"
    stage("chartqa", out, source=str(src))
    shutil.rmtree(src)  # the staged copy must not need the machine it was staged on
    ds = open_dataset(DataConfig(name="chartqa", path=str(out)))
    assert [ds[k]["image"].getpixel((1, 1)) for k in range(3)] == [(0, 0, 0), (0, 0, 40),
                                                                  (0, 0, 80)]
