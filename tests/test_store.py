"""The run store: exact round trips, kill -9 + resume, concurrent shards, damage and bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from schemas.errors import GapError
from schemas.run import shard_indices
from store import layout
from store.encoding import bf16_bits_to_float32
from store.inspect import run_info, verify_run
from store.reader import read_run
from store.view import open_run
from store.writer import RunWriter
from storekit import COORDS, make_record, make_spec, write_shard

HERE = Path(__file__).parent
PY = sys.executable


def _expected_hidden(record, encoding):
    if encoding == "bfloat16":
        return bf16_bits_to_float32(record.hidden)
    return record.hidden.astype(np.float32)


def _assert_same_run(a, b):
    assert set(a.variables) == set(b.variables)
    for name in a.variables:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.parametrize("encoding", ["bfloat16", "float32", "float16"])
def test_round_trip_every_variable(tmp_path, encoding):
    spec = make_spec(encoding, n_total=12)
    records = [make_record(i, spec, fail_every=5) for i in range(12)]
    with RunWriter(tmp_path / "run", spec, segment_tokens=12) as w:
        for r in reversed(records):  # commit order must not matter
            w.put(r)
    ds = open_run(tmp_path / "run")
    assert list(ds.sample_index.values) == list(range(12))
    for k, r in enumerate(records):
        assert ds.sample_id.values[k] == r.sample_id and ds.status.values[k] == r.status
        assert ds.question.values[k] == r.question and json.loads(ds.answers.values[k]) == r.answers
        if r.status != "ok":
            assert ds.error.values[k] == r.error and ds.n_tokens.values[k] == 0
            assert np.isnan(ds.logp_clean.values[k])
            continue
        sel = ds.isel(token=slice(int(ds.token_start[k]), int(ds.token_start[k]) + r.n_tokens))
        assert (sel.token_sample.values == k).all()
        np.testing.assert_array_equal(sel.input_ids.values, r.input_ids)
        np.testing.assert_array_equal(sel.position.values, r.position)
        np.testing.assert_array_equal(sel.is_visual.values, r.is_visual)
        np.testing.assert_array_equal(sel.is_text.values, r.is_text)
        np.testing.assert_array_equal(sel.is_answer.values, r.is_answer)
        np.testing.assert_array_equal(sel.hidden.values, _expected_hidden(r, encoding))
        for name in ("delta", "logp_patched", "trunc_logp"):
            np.testing.assert_array_equal(ds[name].values[k], r.values[name])
        assert ds.logp_clean.values[k] == r.values["logp_clean"]
        assert ds.swap_donor.values[k] == r.values["swap_donor"]
        assert ds.trunc_text.values[k, 2, 0] == r.values["trunc_text"][2, 0]
    assert ds.hidden.chunks is not None  # lazy (dask-backed)
    assert list(ds.trunc_layer.values) == COORDS["trunc_layer"]
    assert verify_run(tmp_path / "run") == []


def test_variables_of_choices_the_run_did_not_make_are_absent(tmp_path):
    # CONTRACT: trunc_text only when generation is configured (an empty text is an answer)
    spec = make_spec(n_total=2, score=("logprob",))
    with RunWriter(tmp_path / "run", spec) as w:
        for i in range(2):
            w.put(make_record(i, spec))
    ds = open_run(tmp_path / "run")
    assert "trunc_text" not in ds and "trunc_logp" in ds and "swap_donor" in ds


def test_zstd_shards_round_trip_and_read_by_zarr(tmp_path):
    import zarr

    spec = make_spec("bfloat16", n_total=5)
    spec.compression = "zstd"
    records = [make_record(i, spec) for i in range(5)]
    with RunWriter(tmp_path / "run", spec, segment_tokens=9) as w:
        for r in records:
            w.put(r)
    ds = open_run(tmp_path / "run")
    expect = np.concatenate([bf16_bits_to_float32(r.hidden) for r in records], axis=1)
    np.testing.assert_array_equal(ds.hidden.values, expect)
    part = layout.part_dir(tmp_path / "run", 0, 1)
    z = zarr.open_array(part / "hidden", mode="r")[:]
    np.testing.assert_array_equal(bf16_bits_to_float32(z[:, : records[0].n_tokens]), expect[:, : records[0].n_tokens])
    assert verify_run(tmp_path / "run") == []


def test_float16_records_overflow(tmp_path):
    spec = make_spec("float16", layers=(0,), n_total=1)
    rec = make_record(0, spec)
    rec.hidden = np.full((1, rec.n_tokens, 16), 1e6, np.float32)
    rec.hidden[0, 0, 0] = 1.0
    with RunWriter(tmp_path / "run", spec) as w:
        w.put(rec)
    ds = open_run(tmp_path / "run")
    assert int(ds.fp16_overflow.values[0]) == rec.n_tokens * 16 - 1


def test_padding_waste_under_ten_percent(tmp_path):
    """300-1300 visual tokens per sample with the real block size of a 2048-wide bf16 model."""
    spec = make_spec("bfloat16", layers=(), hidden_size=2048, n_total=200, block_tokens=None)
    assert spec.block_tokens == 512
    rng = np.random.default_rng(0)
    total = 0
    with RunWriter(tmp_path / "run", spec, commit_seconds=1e9) as w:
        for i in range(200):
            n = int(rng.integers(300, 1301)) + 60
            total += n
            rec = make_record(i, make_spec(layers=()))
            rec.input_ids = np.zeros(n, np.int32)
            rec.position = rec.is_visual = rec.is_text = rec.is_answer = None
            rec.values = {}
            w.put(rec)
    end = sum(p.end for p in read_run(tmp_path / "run").parts)
    waste = (end - total) / total
    assert 0 <= waste <= 0.10
    assert open_run(tmp_path / "run").sizes["token"] == total


def _tensorstore_read(path):
    ts = pytest.importorskip("tensorstore")
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


def test_shards_are_standard_zarr_v3(tmp_path):
    """Our shard files read back identically through zarr-python and through TensorStore."""
    import zarr

    spec = make_spec("bfloat16", n_total=4)
    records = [make_record(i, spec) for i in range(4)]
    with RunWriter(tmp_path / "run", spec, segment_tokens=1000) as w:
        for r in records:
            w.put(r)
    part = layout.part_dir(tmp_path / "run", 0, 1)
    z = zarr.open_array(part / "hidden", mode="r")[:]
    np.testing.assert_array_equal(z, _tensorstore_read(part / "hidden"))
    expect = np.concatenate([r.hidden for r in records], axis=1)
    np.testing.assert_array_equal(z[:, : expect.shape[1]], expect)
    group = zarr.open_group(tmp_path / "run", mode="r")
    assert group.attrs["gap"]["hidden"]["encoding"] == "bfloat16"


def _reference_run(tmp_path, n_total):
    ref = tmp_path / "ref"
    write_shard(str(ref), 0, 1, n_total, resume=False, sleep=0)
    return open_run(ref)


def test_kill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    n_total = 40
    reference = _reference_run(tmp_path, n_total)
    rng = random.Random(7)
    trials = [(0.0, rng.uniform(0.2, 1.2)) for _ in range(3)] + [(0.02, rng.uniform(0.3, 1.0)) for _ in range(3)]
    for trial, (sleep, delay) in enumerate(trials):
        run = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([PY, str(HERE / "storekit.py"), str(run), "0", "1", str(n_total), "0", str(sleep)],
                                cwd=HERE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if run.exists() and (run / "zarr.json").exists():
            before = open_run(run)  # whatever was committed is readable, and only whole samples
            assert (before.status.values == "ok").all()
        write_shard(str(run), 0, 1, n_total, resume=True, sleep=0)
        assert verify_run(run) == [], trial
        _assert_same_run(open_run(run), reference)


def test_four_concurrent_shard_writers(tmp_path):
    n_total = 24
    run = tmp_path / "run"
    procs = [subprocess.Popen([PY, str(HERE / "storekit.py"), str(run), str(i), "4", str(n_total), "0", "0.01"],
                              cwd=HERE) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert verify_run(run) == []
    info = run_info(run)
    assert (info["ok"], info["left"], len(info["shards"])) == (n_total, 0, 4)
    _assert_same_run(open_run(run), _reference_run(tmp_path, n_total))


def test_resume_skips_committed_and_rewrites_nothing(tmp_path):
    run = tmp_path / "run"
    spec = make_spec(n_total=12)
    with RunWriter(run, spec, segment_tokens=5) as w:
        for i in range(6):
            w.put(make_record(i, spec))
    part = layout.part_dir(run, 0, 1)
    committed_files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (part / "hidden" / "c").rglob("*")
                       if p.is_file()}
    with pytest.raises(GapError, match="--resume"):
        RunWriter(run, spec)
    with RunWriter(run, spec, resume=True) as w:
        assert w.committed == set(range(6))
        for i in range(6, 12):
            w.put(make_record(i, spec))
    for path, (mtime, data) in committed_files.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    assert open_run(run).sizes["sample"] == 12


def test_refuses_a_different_model_or_config(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, make_spec(n_total=2)) as w:
        w.put(make_record(0, make_spec()))
    with pytest.raises(GapError, match="'config.model.path' differs"):
        RunWriter(run, make_spec(n_total=2, model_path="/models/other"), resume=True)
    with pytest.raises(GapError, match="'hidden.encoding' differs"):
        RunWriter(run, make_spec("float32", n_total=2), resume=True)


def test_a_config_key_added_since_the_run_began_is_no_difference_at_its_default(tmp_path):
    # A run begun before `capture.tokens` existed: its stored config lacks the key.
    run = tmp_path / "run"
    spec = make_spec(n_total=2)
    with RunWriter(run, spec) as w:
        w.put(make_record(0, spec))
    meta = json.loads((run / "zarr.json").read_text())
    del meta["attributes"]["gap"]["config"]["capture"]["tokens"]
    (run / "zarr.json").write_text(json.dumps(meta))
    with RunWriter(run, spec, resume=True) as w:
        assert w.committed == {0}
    other = make_spec(n_total=2)
    other.config = other.config.model_copy(update={"capture": other.config.capture.model_copy(
        update={"tokens": ["visual"]})})
    with pytest.raises(GapError, match="'config.capture.tokens' differs"):
        RunWriter(run, other, resume=True)


def test_two_writers_may_not_share_a_shard(tmp_path):
    spec = make_spec()
    with RunWriter(tmp_path / "run", spec, shard=(1, 2)):
        with pytest.raises(GapError, match="being written by pid"):
            RunWriter(tmp_path / "run", spec, shard=(1, 2), resume=True)
        RunWriter(tmp_path / "run", spec, shard=(0, 2)).close()  # another shard is fine


def test_non_run_and_unreadable_inputs(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(GapError, match="not a gap run"):
        open_run(tmp_path / "notes")
    with pytest.raises(GapError, match="not a gap run"):
        RunWriter(tmp_path / "notes", make_spec())
    with pytest.raises(GapError, match="no such run"):
        open_run(tmp_path / "missing")


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` with ``options`` for the test's duration (skipped if not allowed)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


def test_read_only_path_is_one_clear_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as target:
        with pytest.raises(GapError, match="cannot write to .*read-only"):
            RunWriter(target / "run", make_spec())
        cli = subprocess.run([PY, "-m", "gap", "store", "info", str(target / "run")], capture_output=True,
                             text=True, cwd=HERE.parent)
        assert cli.returncode == 1 and len(cli.stderr.strip().splitlines()) == 1


def test_full_disk_keeps_committed_samples(tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as mnt:
        spec = make_spec("float32", hidden_size=256, n_total=200)
        run = mnt / "run"
        with pytest.raises(GapError, match="disk full"):
            with RunWriter(run, spec, segment_tokens=8, commit_seconds=0) as w:
                for i in range(200):
                    w.put(make_record(i, spec))
        ds = open_run(run)
        assert 0 < ds.sizes["sample"] < 200
        for k in range(ds.sizes["sample"]):
            rec = make_record(int(ds.sample_index[k]), spec)
            sel = ds.hidden.isel(token=slice(int(ds.token_start[k]), int(ds.token_start[k]) + rec.n_tokens))
            np.testing.assert_array_equal(sel.values, rec.hidden)


def test_verify_finds_damage(tmp_path):
    run = tmp_path / "run"
    spec = make_spec(n_total=12)
    with RunWriter(run, spec, shard=(0, 2), segment_tokens=5) as w:
        for i in shard_indices(12, 0, 2):
            w.put(make_record(i, spec))
    assert verify_run(run) == []
    part = layout.part_dir(run, 0, 2)
    (part / "hidden" / layout.hidden_chunk_key(1)).unlink()
    meta = json.loads((part / "tokens" / "zarr.json").read_text())
    meta["data_type"] = "int64"
    (part / "tokens" / "zarr.json").write_text(json.dumps(meta))
    with open(part / "commits.jsonl", "ab") as fh:
        fh.write(b'{"segment": 99, "start"')
    problems = "\n".join(verify_run(run))
    assert "missing chunks for blocks [1]" in problems
    assert "data_type int64" in problems
    assert "torn commit line" in problems
    # a duplicated sample: another shard claims sample 0 too
    other = layout.part_dir(run, 1, 2)
    other.mkdir()
    log = (part / "commits.jsonl").read_text().splitlines()[0]
    (other / "commits.jsonl").write_text(log + "\n")
    assert any("duplicated sample" in p for p in verify_run(run))
    cli = subprocess.run([PY, "-m", "gap", "store", "verify", str(run)], capture_output=True, text=True,
                         cwd=HERE.parent)
    assert cli.returncode == 1 and "DAMAGED" in cli.stderr
    # an array's metadata cut short is named, and the rest is still checked
    text = (part / "hidden" / "zarr.json").read_text()
    (part / "hidden" / "zarr.json").write_text(text[: len(text) // 2])
    problems = "\n".join(verify_run(run))
    assert "shard-0000-of-0002/hidden: array metadata zarr.json is damaged" in problems
    assert "data_type int64" in problems and "duplicated sample" in problems


def test_info_counts_survive_files_renamed_while_walking(tmp_path, monkeypatch):
    # a live writer renames its temporary files away between the listing and the size
    from store import inspect as store_inspect

    run = tmp_path / "run"
    spec = make_spec(n_total=4)
    with RunWriter(run, spec) as w:
        for i in range(4):
            w.put(make_record(i, spec))
    before = store_inspect.run_info(run)
    real = os.walk

    def walk_with_a_vanished_file(top):
        for root, dirs, names in real(top):
            yield root, dirs, [*names, ".0.tmp4242"]

    monkeypatch.setattr(store_inspect.os, "walk", walk_with_a_vanished_file)
    after = store_inspect.run_info(run)
    assert (after["files"], after["bytes"]) == (before["files"], before["bytes"]) and after["ok"] == 4


# not UTF-8; a line break only to splitlines; still JSON but a commit's key changed
@pytest.mark.parametrize("byte", [b"\xff", b"\r", b"q"])
def test_a_damaged_commit_line_loses_only_its_segment_and_resume_recaptures_it(tmp_path, byte):
    # A complete line that is no longer a commit (a flipped byte) hides its own samples only; the
    # commits after it still count, verify names the line, and --resume captures them again
    # without dropping anything committed.
    n_total = 30
    reference = _reference_run(tmp_path, n_total)
    run = tmp_path / "run"
    write_shard(str(run), 0, 1, n_total, resume=False, sleep=0)
    log_path = layout.part_dir(run, 0, 1) / layout.COMMITS
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4
    lost = {s["index"] for s in json.loads(lines[1])["samples"]}
    at = lines[1].index(b'"samples"') + 6 if byte == b"q" else 5  # "samples" -> "samplqs"
    lines[1] = lines[1][:at] + byte + lines[1][at + 1:]  # same length
    log_path.write_bytes(b"".join(lines))
    ds = open_run(run)
    assert set(ds.sample_index.values) == set(range(n_total)) - lost
    assert verify_run(run) == ["shard-0000-of-0001: commit line 2 is damaged (not a commit): its samples are not in "
                               "the view (gap capture --resume captures any missing)"]
    with pytest.raises(GapError, match="pass --resume"):
        RunWriter(run, make_spec(n_total=n_total))
    write_shard(str(run), 0, 1, n_total, resume=True, sleep=0)
    _assert_same_run(open_run(run), reference)
    assert len(verify_run(run)) == 1  # the damaged line itself stays


def test_opens_with_different_chunks_compute_together(tmp_path):
    # each open's dask graph has keys of its own: one computation over both gives the same values
    import dask

    spec = make_spec("float32", n_total=12)
    with RunWriter(tmp_path / "run", spec, segment_tokens=10) as w:
        for i in range(12):
            w.put(make_record(i, spec))
    a, b = open_run(tmp_path / "run"), open_run(tmp_path / "run", chunks=8)
    assert a.hidden.data.chunks != b.hidden.data.chunks
    got_a, got_b = dask.compute(a.hidden.data, b.hidden.data)
    np.testing.assert_array_equal(got_a, got_b)
    assert float(abs(a.hidden - b.hidden).max()) == 0.0


def test_hidden_chunks_hold_whole_samples_and_the_graph_does_not_grow_with_them(tmp_path):
    # three interleaved shards, samples written out of order: one array over the whole view
    from store.view import sample_chunks

    spec = make_spec("float32", n_total=30)
    for shard in range(3):
        with RunWriter(tmp_path / "run", spec, shard=(shard, 3)) as w:
            for i in reversed(range(shard, 30, 3)):
                w.put(make_record(i, spec))
    ds = open_run(tmp_path / "run", chunks=20)
    n_tokens = ds.n_tokens.values
    chunks = ds.hidden.data.chunks[1]
    assert chunks == sample_chunks(n_tokens, 20) and max(chunks) <= max(20, n_tokens.max())
    edges = set(np.cumsum(chunks).tolist())
    assert edges <= set((ds.token_start.values + n_tokens).tolist())  # no sample is split
    assert len(ds.hidden.data.__dask_graph__()) == len(spec.layers) * len(chunks) + 1
    assert ds.attrs["hidden_layers"] == list(spec.layers)
    for k in (0, 7, 29):  # any sample's states, selected through its token range
        a = int(ds.token_start[k])
        got = ds.hidden.isel(token=slice(a, a + int(n_tokens[k]))).values
        np.testing.assert_array_equal(got, make_record(int(ds.sample_index[k]), spec).hidden)


def test_hidden_part_reads_stepped_token_slices(tmp_path):
    from store.reader import read_run
    from store.view import HiddenPart

    spec = make_spec("float32", n_total=6)
    with RunWriter(tmp_path / "run", spec) as w:
        for i in range(6):
            w.put(make_record(i, spec))
    part = read_run(tmp_path / "run").parts[0]
    source = HiddenPart(part.path / layout.HIDDEN, spec.attrs()["hidden"], part.end)
    full = source[slice(None), slice(None), slice(None)]
    for tokens in (slice(0, 10, 2), slice(3, 17, 5), slice(12, 2, -3), slice(5, 5)):
        np.testing.assert_array_equal(source[slice(None), tokens, slice(None)], full[:, tokens], err_msg=str(tokens))


def test_store_cli_info_json(tmp_path):
    run = tmp_path / "run"
    spec = make_spec(n_total=12)
    with RunWriter(run, spec) as w:
        for i in range(5):
            w.put(make_record(i, spec, fail_every=5))
    out = subprocess.run([PY, "-m", "gap", "store", "info", str(run), "--json"], capture_output=True,
                         text=True, cwd=HERE.parent, check=True)
    info = json.loads(out.stdout)
    assert (info["ok"], info["failed"], info["left"], info["layers"]) == (4, 1, 7, [0, 1, 2])
    bad = subprocess.run([PY, "-m", "gap", "store", "info", str(tmp_path)], capture_output=True, text=True,
                         cwd=HERE.parent)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_store_imports_without_torch(tmp_path):
    run = tmp_path / "run"
    spec = make_spec(n_total=1)
    with RunWriter(run, spec) as w:
        w.put(make_record(0, spec))
    code = ("import sys; from store import open_run; ds = open_run(%r); ds.hidden.values;"
            "assert 'torch' not in sys.modules and 'nnsight' not in sys.modules, 'heavy import'" % str(run))
    subprocess.run([PY, "-c", code], check=True, cwd=HERE.parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chmod-proof checks")
def test_files_are_not_world_writable(tmp_path):
    run = tmp_path / "run"
    spec = make_spec(n_total=1)
    old = os.umask(0o022)
    try:
        with RunWriter(run, spec) as w:
            w.put(make_record(0, spec))
    finally:
        os.umask(old)
    for path in run.rglob("*"):
        assert not path.stat().st_mode & 0o002, path


def test_short_writes_are_resumed_mid_piece(tmp_path, monkeypatch):
    # writev may write less than asked (signals, huge files); every byte must still land once.
    real = os.writev
    calls = []

    def short(fd, views):
        calls.append(len(views))
        return real(fd, [memoryview(b"".join(bytes(v) for v in views))[:7]])

    monkeypatch.setattr(layout.os, "writev", short)
    monkeypatch.setattr(layout, "_IOV_MAX", 3)
    pieces = [b"abcde", b"", np.arange(6, dtype=np.float16), memoryview(b"0123456789"), b"xyz"]
    layout.atomic_write(tmp_path / "f", pieces)
    expected = b"abcde" + np.arange(6, dtype=np.float16).tobytes() + b"0123456789xyz"
    assert (tmp_path / "f").read_bytes() == expected
    assert len(calls) == -(-len(expected) // 7) and max(calls) == 3


def test_padding_is_left_as_holes_that_read_as_zeros(tmp_path):
    # A segment's last block pads each layer with zero rows; they are holes, not written bytes.
    layout.atomic_write(tmp_path / "f", [b"ab", 3 * 4096, b"cd", 10])
    assert (tmp_path / "f").read_bytes() == b"ab" + bytes(3 * 4096) + b"cd" + bytes(10)
    rng = np.random.default_rng(0)
    parts = [rng.integers(1, 60000, (2, 3, 1024), dtype=np.uint16), rng.integers(1, 60000, (2, 2, 1024), dtype=np.uint16)]
    pad, block = 59, 64
    pieces = layout.encode_hidden_shard(parts, pad_tokens=pad)
    path = tmp_path / "shard"
    layout.atomic_write(path, pieces, fsync=True)
    full = layout.read_hidden_shard(path, 2, block, 1024, np.dtype(np.uint16), slice(None), slice(None))
    expected = np.concatenate([*parts, np.zeros((2, pad, 1024), np.uint16)], axis=1)
    np.testing.assert_array_equal(full, expected)
    hole = pad * 1024 * 2
    assert path.stat().st_size == 2 * block * 1024 * 2 + 2 * 16 + 4  # chunks + index + crc
    assert layout.data_bytes(pieces) == path.stat().st_size - 2 * hole
    # the filesystem stores the data only (give each layer's edges a page each way)
    assert path.stat().st_blocks * 512 <= layout.data_bytes(pieces) + 4 * 4096


def test_commit_line_follows_its_blocks_written_on_io_threads(tmp_path, monkeypatch):
    # Blocks are written on I/O threads; slow ones must still be on disk before the commit
    # line that covers them (a killed writer's committed samples are whole).
    import store.writer as writer_module

    events = []
    real_files, real_commit = writer_module._write_files, layout.encode_commit

    def slow_files(block_index, files):
        time.sleep(0.02 * random.random())
        done = real_files(block_index, files)
        events.extend(("block", int(path.parent.name)) for path, _ in files if layout.HIDDEN in path.parts)
        return done

    def commit(c):
        events.append(("commit", c["end"]))
        return real_commit(c)

    monkeypatch.setattr(writer_module, "_write_files", slow_files)
    monkeypatch.setattr(layout, "encode_commit", commit)
    spec = make_spec(n_total=30)
    with RunWriter(tmp_path / "run", spec, segment_tokens=20) as w:
        for i in range(30):
            w.put(make_record(i, spec))
    written = set()
    commits = 0
    for kind, value in events:
        if kind == "block":
            written.add(value)
        else:
            commits += 1
            assert set(range(value // spec.block_tokens)) <= written, (value, sorted(written))
    assert commits > 3 and verify_run(tmp_path / "run") == []


def test_a_commit_line_is_fsynced_after_the_names_of_everything_it_covers(tmp_path, monkeypatch):
    # Power loss keeps only what was fsynced: a block file's bytes, its name (its directory) and
    # the name of each directory made for it must all be fsynced before the commit line's own
    # fsync, or a node crash could leave a committed sample whose file is gone.
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    spec = make_spec(n_total=30)
    run = tmp_path / "run"
    (run / "slurm" / "logs").mkdir(parents=True)  # as `gap slurm submit` leaves it, fsynced by nobody
    with RunWriter(run, spec, segment_tokens=20) as w:
        for i in range(30):
            w.put(make_record(i, spec))
    part = layout.part_dir(run, 0, 1)
    log = str(part / layout.COMMITS)
    commits = layout.parse_commit_log((part / layout.COMMITS).read_bytes()).commits
    at_commit = [k for k, path in enumerate(synced) if path == log]
    assert len(at_commit) == len(commits) > 3

    def before(path: Path, k: int) -> list[int]:
        return [j for j in range(k) if synced[j] == str(path)]

    for commit, k in zip(commits, at_commit):
        for b in range(commit["end"] // spec.block_tokens):
            for array, key in ((layout.HIDDEN, layout.hidden_chunk_key(b)), (layout.TOKENS, layout.tokens_chunk_key(b))):
                file = part / array / key
                data = [j for j in range(k) if synced[j].startswith(str(file.parent / f".{file.name}.tmp"))]
                assert data, (file, "bytes not fsynced before the commit")
                assert [j for j in before(file.parent, k) if j > data[-1]], (file, "rename not fsynced")
                assert before(file.parent.parent, k), (file.parent, "new directory's name not fsynced")
    first = at_commit[0]
    for path in (run.parent, run, run / layout.PARTS, part, part / layout.HIDDEN, part / layout.TOKENS,
                 part / layout.HIDDEN / "zarr.json", part / layout.TOKENS / "zarr.json"):
        assert before(path, first) or path.is_file() and any(
            s.startswith(str(path.parent / f".{path.name}.tmp")) for s in synced[:first]), path
    assert str(part) in synced[first + 1:], "the new commit log's name is fsynced"
    assert verify_run(run) == []


def test_wait_seconds_is_the_time_the_producer_was_held_up_by_the_store(tmp_path, monkeypatch):
    # A slow disk holds a fast producer up for nearly the whole run (full queue, final flush);
    # a slow producer beside a fast disk is hardly held up at all.
    import store.writer as writer_module

    real_files = writer_module._write_files
    spec = make_spec(n_total=12)
    records = [make_record(i, spec) for i in range(12)]

    def timed(run, slow_disk: bool, producer_sleep: float) -> tuple[float, float]:
        monkeypatch.setattr(writer_module, "_write_files",
                            (lambda b, files: (time.sleep(0.05), real_files(b, files))[1]) if slow_disk
                            else real_files)
        with RunWriter(run, spec) as w:
            start = time.perf_counter()  # from the first put to the end of the final flush
            for r in records:
                w.put(r)
                time.sleep(producer_sleep)
        return w.wait_seconds, time.perf_counter() - start

    n_blocks = -(-sum(r.n_tokens for r in records) // spec.block_tokens)
    wait, wall = timed(tmp_path / "slow_disk", slow_disk=True, producer_sleep=0.0)
    assert wall >= 0.05 * n_blocks / writer_module.IO_THREADS
    assert wait >= 0.9 * wall
    wait, wall = timed(tmp_path / "slow_producer", slow_disk=False, producer_sleep=0.05)
    assert wall >= 0.05 * len(records) and wait <= 0.25 * wall


def test_a_retried_failed_sample_replaces_its_record_and_an_ok_one_may_not_be_replaced(tmp_path):
    from schemas.run import failed_record

    spec = make_spec(n_total=3)
    records = [make_record(i, spec) for i in range(3)]
    run = tmp_path / "run"
    with RunWriter(run, spec) as w:
        w.put(records[0])
        w.put(failed_record(1, records[1].sample_id, "CUDA out of memory", status="oom"))
        w.put(records[2])
    with RunWriter(run, spec, resume=True) as w:
        assert w.committed_status == {0: "ok", 1: "oom", 2: "ok"}
        w.put(records[1])  # the retry
    assert verify_run(run) == []
    ds = open_run(run)
    assert list(ds["status"].values) == ["ok"] * 3
    retried = ds.sel(sample=1)
    mask = ds["token_sample"].values == 1
    assert retried["n_tokens"].item() == records[1].n_tokens == mask.sum()
    np.testing.assert_array_equal(ds["input_ids"].values[mask], records[1].input_ids)
    # an ok record committed again (here by a writer that forgot its log) is a duplicate
    with RunWriter(run, spec, resume=True) as w:
        w.committed_status.clear()
        w.put(records[0])
    assert any("toy/test/0 was committed again after an ok record" in p for p in verify_run(run))


def test_verify_leaves_a_live_writers_work_in_progress_alone(tmp_path):
    # Blocks past the last commit and a half-written line are damage once the writer is gone,
    # but only work in progress while it holds the shard.
    import fcntl
    import shutil

    from store.inspect import run_info

    spec = make_spec(n_total=4)
    run = tmp_path / "run"
    with RunWriter(run, spec) as w:
        for i in range(2):
            w.put(make_record(i, spec))
    part = layout.part_dir(run, 0, 1)
    n_blocks = read_run(run).parts[0].end // spec.block_tokens
    with open(part / layout.LOCK, "a+") as lock:  # a capture between two commits holds it
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write("pid 4242 on node7\n")
        lock.flush()
        for name, key in ((layout.HIDDEN, layout.hidden_chunk_key), (layout.TOKENS, layout.tokens_chunk_key)):
            (part / name / key(n_blocks)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(part / name / key(0), part / name / key(n_blocks))
        with open(part / layout.COMMITS, "ab") as fh:
            fh.write(b'{"segment": 1, "sta')
        assert verify_run(run) == []
        assert run_info(run)["shards"][0]["writer"] == "pid 4242 on node7"
    problems = "\n".join(verify_run(run))
    assert "torn commit line" in problems and f"uncommitted leftover chunks [{n_blocks}]" in problems
    assert run_info(run)["shards"][0]["writer"] is None


def test_verify_data_finds_changed_bytes_that_the_structure_check_cannot(tmp_path):
    # The structural check reads no data; --data recomputes every block file's checksum.
    from store.inspect import verify_data

    spec = make_spec(n_total=12)
    run = tmp_path / "run"
    with RunWriter(run, spec, segment_tokens=10) as w:
        for i in range(12):
            w.put(make_record(i, spec))
    assert verify_data(run, progress=False) == ([], 0)
    part = layout.part_dir(run, 0, 1)
    hidden = [part / layout.HIDDEN / layout.hidden_chunk_key(b) for b in range(3)]
    tokens = part / layout.TOKENS / layout.tokens_chunk_key(1)
    data = bytearray(hidden[0].read_bytes())
    data[100] ^= 0x01  # one bit of one value
    hidden[0].write_bytes(bytes(data))
    hidden[2].write_bytes(hidden[1].read_bytes())  # a block copied over another
    data = bytearray(tokens.read_bytes())
    data[4] ^= 0x10  # an input id
    tokens.write_bytes(bytes(data))
    assert verify_run(run) == []  # sizes, index checksums and token owners all still agree
    problems, unchecked = verify_data(run, progress=False)
    name = part.name
    assert problems == [f"{name}/hidden: block 0: checksum mismatch (its bytes changed after the commit)",
                        f"{name}/tokens: block 1: checksum mismatch (its bytes changed after the commit)",
                        f"{name}/hidden: block 2: checksum mismatch (its bytes changed after the commit)"]
    assert unchecked == 0
    cli = subprocess.run([PY, "-m", "gap", "store", "verify", str(run), "--data", "-q"], capture_output=True,
                         text=True, cwd=HERE.parent)
    assert cli.returncode == 1 and cli.stderr.count("checksum mismatch") == 3
    # a run written before checksums: its segments are counted as unchecked, not as damaged
    log_path = part / layout.COMMITS
    old = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    log_path.write_bytes(b"".join(json.dumps({k: v for k, v in c.items() if "crc32" not in k}).encode() + b"\n"
                                  for c in old))
    assert verify_data(run, progress=False) == ([], len(old)) and verify_run(run) == []


def test_a_commit_line_with_a_changed_number_is_damaged_and_old_lines_still_count(tmp_path):
    # A digit changed inside a commit line is still JSON and still a commit: its checksum says
    # it is not the line the writer wrote. Lines written before checksums pass unchecked.
    line = layout.encode_commit({"segment": 0, "start": 0, "stop": 5, "end": 8, "samples": [
        {"index": 3, "sample_id": "a/3", "status": "ok", "n_tokens": 5, "offset": 0}]})
    changed = line.replace(b'"offset":0', b'"offset":1')
    old = b'{"segment":1,"start":8,"stop":9,"end":16,"samples":[]}\n'
    log = layout.parse_commit_log(line + changed + old)
    assert [c["segment"] for c in log.commits] == [0, 1] and log.damaged == [(2, 1)]
    assert layout.line_intact(line.rstrip(b"\n")) and not layout.line_intact(changed.rstrip(b"\n"))


def test_run_hidden_reads_any_slice_like_numpy(tmp_path):
    from store.reader import read_run
    from store.view import RunHidden, _token_ranges, committed_samples

    spec = make_spec("float32", n_total=9)
    for shard in range(2):
        with RunWriter(tmp_path / "run", spec, shard=(shard, 2)) as w:
            for i in range(shard, 9, 2):
                w.put(make_record(i, spec))
    state = read_run(tmp_path / "run")
    source = RunHidden(state, _token_ranges(committed_samples(state)))
    whole = np.concatenate([make_record(i, spec).hidden for i in range(9)], axis=1)
    assert source.shape == whole.shape
    n = whole.shape[1]
    for key in (slice(None), slice(3, 40), slice(None, None, -1), slice(n - 2, 2, -3), slice(12, 2),
                slice(5, 5), slice(1, n, 7)):
        np.testing.assert_array_equal(source[:, key, :], whole[:, key, :], err_msg=str(key))


def test_a_token_carrying_another_samples_index_fails_the_open_in_one_line(tmp_path):
    spec = make_spec(n_total=4)
    with RunWriter(tmp_path / "run", spec) as w:
        for i in range(4):
            w.put(make_record(i, spec))
    chunk = layout.part_dir(tmp_path / "run", 0, 1) / layout.TOKENS / layout.tokens_chunk_key(0)
    table = np.frombuffer(chunk.read_bytes(), "<i4").reshape(-1, 4).copy()
    table[2, 3] = 1000  # token 2 (of sample 0) now names a sample that does not exist
    chunk.write_bytes(table.tobytes())
    with pytest.raises(GapError, match=r"token 2 of the view carries sample index 1000, not 0: the tokens "
                                       r"table is damaged \(gap store verify\)$"):
        open_run(tmp_path / "run")
