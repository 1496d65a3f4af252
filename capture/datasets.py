"""Offline, lazy loaders for the hub VQA datasets in their own schemas, plus the synthetic set.

A loader reads a local directory: parquet files (a staged copy from ``gap data stage``, or a hub
snapshot in the HF hub cache), Arrow files (``datasets.save_to_disk`` or the ``datasets`` cache)
or an imagefolder (``SPLIT/metadata.jsonl`` next to the images). Nothing touches the network, so
compute nodes without internet read exactly what was staged. Rows are read on demand (one parquet
row group or one memory-mapped Arrow slice at a time), never a whole split. Each sample keeps the
stable id ``dataset/split/row`` whatever ``limit`` or sampling selected it.

Bad configuration (missing path, unknown split, missing column, a split without answers) raises
``ConfigError`` naming the key or path; a bad sample (unreadable image, empty question, no
answers) raises :class:`DataError` naming the sample id, which the capture loop records as a
failed sample before going on.

Examples
--------
>>> from schemas.config import DataConfig
>>> ds = open_dataset(DataConfig(name="synthetic", limit=4))
>>> len(ds), ds[1]["sample_id"]
(4, 'synthetic/test/1')
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from schemas.answers import most_common_answer
from schemas.config import ConfigError, DataConfig
from schemas.errors import GapError

log = logging.getLogger(__name__)

# Larger images are refused as likely decompression bombs (PIL's own warning threshold, ~89 Mpx;
# real DocVQA pages are under 10 Mpx). Resizing to the model's pixel budget is the processor's job.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
SYNTHETIC_DEFAULT_ROWS = 256
SYNTHETIC_IMAGE_SIZE = 56


class DataError(GapError):
    """One sample cannot be used; the message is ``"<sample_id>: <reason>"`` on one line."""

    def __init__(self, sample_id: str, reason: str, index: int | None = None) -> None:
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id, self.reason, self.index = sample_id, reason, index


@dataclass(frozen=True)
class Spec:
    """Where a dataset lives on the hub and which of its columns hold what."""

    repo: str
    config: str | None
    question: str
    answers: str


SPECS: dict[str, Spec] = {
    "chartqa": Spec("HuggingFaceM4/ChartQA", None, "query", "label"),
    "docvqa": Spec("lmms-lab/DocVQA", "DocVQA", "question", "answers"),
    "textvqa": Spec("lmms-lab/textvqa", None, "question", "answers"),
    "vqav2": Spec("lmms-lab/VQAv2", None, "question", "answers"),
    "scienceqa": Spec("derek-thomas/ScienceQA", None, "question", "answer"),
}
# Datasets scored by VQA accuracy: every human answer counts (blank ones too, in the
# denominator), and answers are equal as the VQA normalisation makes them.
VQA_SCORED = ("textvqa", "vqav2")


# ----------------------------------------------------------------------------- images

def to_rgb(value: Any, sample_id: str, base: Path | None = None) -> Image.Image:
    """Decode a stored image (HF ``{bytes, path}`` struct, bytes, path or PIL image) to RGB.

    Grayscale, palette, RGBA (composited on white, as a page would show), CMYK and 16-bit or float
    images are converted; EXIF rotation is applied. Unreadable bytes, a missing file or an image
    above :data:`MAX_IMAGE_PIXELS` raise :class:`DataError`.

    Examples
    --------
    >>> buf = io.BytesIO(); Image.new("LA", (3, 2), (90, 0)).save(buf, "PNG")
    >>> im = to_rgb({"bytes": buf.getvalue(), "path": None}, "x/test/0")
    >>> im.mode, im.size, im.getpixel((0, 0))
    ('RGB', (3, 2), (255, 255, 255))
    """
    if value is None:
        raise DataError(sample_id, "no image")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data else path
        if value is None:
            raise DataError(sample_id, "image record has neither bytes nor path")
    file = None  # the image's file on disk, named in its errors
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(value, Image.Image):
                img = value
            elif isinstance(value, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(value)))
            elif not isinstance(value, (str, os.PathLike)):
                raise DataError(sample_id, f"image value of type {type(value).__name__} is neither a "
                                           "file path nor image bytes")
            else:
                file = Path(value)
                if not file.is_absolute() and base is not None:
                    file = base / file
                img = Image.open(file)
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(sample_id, f"image is {width}x{height} = "
                                f"{width * height / 1e6:.0f} Mpx, above the "
                                f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx decompression-bomb limit")
            img.load()
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(sample_id, f"image refused as a decompression bomb ({exc})") from None
    except FileNotFoundError:
        raise DataError(sample_id, f"image file not found: {file}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise all three
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        named = f" {file}" if file is not None and str(file) not in reason else ""
        raise DataError(sample_id, f"image{named} is not readable ({reason})") from None
    return _convert(ImageOps.exif_transpose(img))


def _convert(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert clips these to 0..255 instead of scaling: scale by the value range.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------- sources

class _Source:
    """Random access to the rows of one split, whatever the files' format."""

    base: Path
    n_rows: int
    columns: list[str]
    paths: list[Path]  # the split's files, in row order
    file_starts: list[int]  # the first row of each file

    def file_of(self, i: int) -> Path:
        """The file holding row ``i`` (named in the errors of reading it)."""
        return self.paths[bisect_right(self.file_starts, i) - 1]

    def row(self, i: int, columns: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def null_mask(self, column: str, head: int | None = None) -> np.ndarray:
        """Which rows (the first ``head`` at least, or all) hold null or an empty list in ``column``."""
        raise NotImplementedError


class _ParquetSource(_Source):
    """Rows of parquet files; reads one row group at a time and keeps the last one per thread.

    Capture reads its shard on one thread and swap donors on another: a ``ParquetFile`` is not
    safe to read from two threads at once (crashes, or a good row read as damaged), so reads
    take a lock, and each thread keeps its own last group (a donor read does not evict the
    shard's).
    """

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.base, self.paths = files[0].parent, files
        self.files = []
        for f in files:
            try:
                self.files.append(pq.ParquetFile(f))
            except (OSError, ValueError) as exc:  # pyarrow's IO / Invalid: truncated, not parquet
                raise _unreadable(f, "parquet", exc) from None
        # a column missing from one shard would read as absent in its rows only: count only
        # the columns every file has, so that _check_columns names the missing one at open
        names = [pf.schema_arrow.names for pf in self.files]
        self.columns = [c for c in names[0] if all(c in n for n in names[1:])]
        self.groups: list[tuple[int, int]] = []
        starts, self.file_starts = [0], []
        for k, pf in enumerate(self.files):
            self.file_starts.append(starts[-1])
            for g in range(pf.metadata.num_row_groups):
                self.groups.append((k, g))
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        self.starts = starts
        self.n_rows = starts[-1]
        self._lock = threading.Lock()
        self._cache = threading.local()  # .group: (key, table) of this thread's last read

    def row(self, i: int, columns: list[str]) -> dict[str, Any]:
        g = bisect_right(self.starts, i) - 1
        key = (g, tuple(columns))
        cached = getattr(self._cache, "group", (None, None))
        if cached[0] != key:
            k, group = self.groups[g]
            with self._lock:
                cached = (key, self.files[k].read_row_group(group, columns=columns))
            self._cache.group = cached
        return cached[1].slice(i - self.starts[g], 1).to_pylist()[0]

    def null_mask(self, column: str, head: int | None = None) -> np.ndarray:
        # A struct's sub-field carries the struct's nulls, so image nullness costs no image bytes.
        sub = f"{column}.path" if "path" in _struct_fields(self.files[0], column) else column
        parts, seen = [], 0
        for g, (k, group) in enumerate(self.groups):
            if head is not None and seen >= head:
                break
            try:
                with self._lock:
                    part = _absent(self.files[k].read_row_group(group, columns=[sub]).column(0))
            except (OSError, ValueError) as exc:  # damaged: its rows fail one by one when loaded
                log.warning("%s: row group %d unreadable (%s); its rows count as present", self.paths[k],
                            group, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                part = np.zeros(self.starts[g + 1] - self.starts[g], bool)
            parts.append(part)
            seen += len(part)
        return np.concatenate(parts) if parts else np.zeros(0, bool)


def _unreadable(path: Path, kind: str, exc: Exception) -> ConfigError:
    """One line naming a split file that cannot be opened, with the reader's first sentence."""
    reason = str(exc).splitlines()[0].split(". ")[0].rstrip(".") if str(exc) else type(exc).__name__
    return ConfigError(f"data.path: {path}: not a readable {kind} file ({reason})")


def _read_arrow(path: Path) -> Any:
    """An Arrow IPC file as a table over its memory map: the stream format (``save_to_disk``,
    the ``datasets`` cache), else the file format."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (OSError, ValueError) as exc:  # pyarrow's IO / Invalid
        stream_error = exc
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, ValueError):
        # a stream cut short also fails as a file ("Not an Arrow file"): the stream's reason tells more
        raise _unreadable(path, "Arrow", stream_error) from None


def _struct_fields(pf: Any, column: str) -> list[str]:
    import pyarrow as pa

    field = pf.schema_arrow.field(column)
    return [f.name for f in field.type] if pa.types.is_struct(field.type) else []


class _ArrowSource(_Source):
    """Rows of memory-mapped Arrow IPC files (``save_to_disk`` or the ``datasets`` cache)."""

    def __init__(self, files: list[Path]) -> None:
        import pyarrow as pa

        self.base, self.paths = files[0].parent, files
        tables = [_read_arrow(f) for f in files]
        self.file_starts = np.cumsum([0] + [t.num_rows for t in tables[:-1]]).tolist()
        self.table = pa.concat_tables(tables)  # zero-copy over the maps, nothing is read yet
        self.columns = self.table.column_names
        self.n_rows = self.table.num_rows

    def row(self, i: int, columns: list[str]) -> dict[str, Any]:
        return self.table.select(columns).slice(i, 1).to_pylist()[0]

    def null_mask(self, column: str, head: int | None = None) -> np.ndarray:
        values = self.table.column(column)
        values = values if head is None else values.slice(0, head)
        return _absent(values)


class _ImagefolderSource(_Source):
    """``SPLIT/metadata.jsonl`` rows (text only, kept in memory) with images beside them."""

    def __init__(self, metadata: Path) -> None:
        self.base, self.paths, self.file_starts = metadata.parent, [metadata], [0]
        self.rows = []
        with metadata.open() as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ConfigError(f"{metadata}:{line_no}: not valid JSON") from None
        self.columns = sorted({k for r in self.rows for k in r} | {"image"})
        self.n_rows = len(self.rows)

    def row(self, i: int, columns: list[str]) -> dict[str, Any]:
        raw = self.rows[i]
        out = {c: raw.get(c) for c in columns}
        if "image" in columns:
            name = raw.get("file_name")
            out["image"] = None if name is None else {"bytes": None, "path": name}  # to_rgb joins base
        return out

    def null_mask(self, column: str, head: int | None = None) -> np.ndarray:
        key = "file_name" if column == "image" else column
        return np.array([r.get(key) is None or r.get(key) == [] for r in self.rows[:head]], dtype=bool)


def _absent(values: Any) -> np.ndarray:
    """Null cells, and empty lists (a split whose answers are all ``[]`` has none either)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    absent = values.is_null()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        absent = pc.or_(absent, pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0))
    return absent.to_numpy(zero_copy_only=False)


# ----------------------------------------------------------------------------- discovery

# "-00000-of-00002", and on some hub repos a content hash after it
_SHARD = re.compile(r"-(\d+)-of-(\d+)(-[0-9a-f]{8,})?$")


def split_of(path: Path) -> str:
    """The split a parquet / Arrow file belongs to, from the hub's and ``datasets``' names.

    >>> split_of(Path("data/test-00000-of-00002.parquet")), split_of(Path("val/0000.parquet"))
    ('test', 'val')
    >>> split_of(Path("data/val-00000-of-00001-0f11003c77497969.parquet"))  # HuggingFaceM4/ChartQA
    'val'
    >>> split_of(Path("chart_qa-train.arrow")), split_of(Path("train/data-00000-of-00001.arrow"))
    ('train', 'train')
    """
    base = _SHARD.sub("", path.stem)
    if base == "data" or base.isdigit() or re.fullmatch(r"(part|shard)[-_]?\d+", base):
        return path.parent.name.removeprefix("partial-")
    if path.suffix == ".arrow" and "-" in base:
        return base.rsplit("-", 1)[1]  # datasets cache: "{builder}-{split}"
    return base


def _check_complete(files: list[Path], split: str) -> None:
    """Refuse a split whose ``-K-of-N`` files are not all there (a staging or download that
    stopped half way would otherwise read as a smaller split)."""
    shards = [m for m in (_SHARD.search(f.stem) for f in files) if m]
    if not shards:
        return
    totals = {int(m.group(2)) for m in shards}
    have = {int(m.group(1)) for m in shards}
    if len(totals) > 1 or len(shards) != len(files) or have != set(range(next(iter(totals)))):
        n = max(totals)
        missing = sorted(set(range(n)) - have)
        more = "..." if len(missing) > 5 else ""
        mixed = ", mixed -of- counts" if len(totals) > 1 else ""
        raise ConfigError(f"data.split {split!r} in {files[0].parent} is incomplete: {len(files)} file(s) "
                          f"for {n} (missing {missing[:5]}{more}{mixed}); stage it again")


def _find_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """``{format: {split: files}}`` for every split found under ``root``."""
    found: dict[str, dict[str, list[Path]]] = {"parquet": {}, "arrow": {}, "imagefolder": {}}
    for path in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        if path.suffix in (".parquet", ".arrow"):
            found[path.suffix[1:]].setdefault(split_of(path), []).append(path)
        elif path.name == "metadata.jsonl":
            found["imagefolder"].setdefault(path.parent.name, []).append(path)
    return found


def _open_source(root: Path, split: str, config_name: str | None) -> _Source:
    if not root.exists():
        raise ConfigError(f"data.path {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"data.path {root} is not a directory")
    if config_name and (root / config_name).is_dir():
        root = root / config_name
    found = _find_files(root)
    splits = sorted({s for by_split in found.values() for s in by_split})
    if not splits:
        raise ConfigError(f"data.path {root}: no parquet, Arrow or imagefolder (metadata.jsonl) "
                          "files; stage one with `gap data stage NAME --to DIR`")
    for fmt in ("parquet", "arrow", "imagefolder"):
        files = found[fmt].get(split)
        if not files:
            continue
        dirs = sorted({str(f.parent.relative_to(root)) for f in files})
        if len(dirs) > 1:
            raise ConfigError(f"data.path {root}: split {split!r} is in several directories "
                              f"({', '.join(dirs)}); set data.config_name or point data.path "
                              "at one")
        if fmt == "imagefolder":
            return _ImagefolderSource(files[0])
        _check_complete(files, split)
        return _ParquetSource(files) if fmt == "parquet" else _ArrowSource(files)
    raise ConfigError(f"data.split {split!r} not found under {root}; found: {', '.join(splits)}")


def hub_cache_snapshot(repo: str) -> Path | None:
    """The local snapshot directory of a hub dataset repo in the HF hub cache, if any.

    Honours ``HF_HUB_CACHE`` and ``HF_HOME``; prefers the revision ``refs/main`` points at.
    """
    import os

    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    repo_dir = cache / f"datasets--{repo.replace('/', '--')}"
    main = repo_dir / "refs" / "main"
    if main.is_file() and (repo_dir / "snapshots" / main.read_text().strip()).is_dir():
        return repo_dir / "snapshots" / main.read_text().strip()
    snaps = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


# ----------------------------------------------------------------------------- samples

def _texts(value: Any, keep_blank: bool = False) -> list[str]:
    """Gold answers as strings (blank ones only with ``keep_blank``): accepts a string, a list,
    or VQAv2's answer dicts."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("answer")
        if item is not None and (keep_blank or str(item).strip()):
            out.append(str(item).strip())
    return out


OPTIONS = "\nOptions: "  # what follows a ScienceQA question in its prompt: the lettered choices
CONTEXT = "Context: "  # what precedes a ScienceQA question that has a hint (LLaVA's CQM prompt order)


def _row_to_sample(name: str, spec: Spec, row: dict[str, Any], sample_id: str,
                   base: Path) -> dict[str, Any]:
    question = row.get(spec.question)
    if not isinstance(question, str) or not question.strip():
        raise DataError(sample_id, "empty question")
    question = asked = question.strip()
    if name == "scienceqa":
        raw = row.get("choices")
        choices = [str(c).strip() for c in ([raw] if isinstance(raw, str) else raw or [])]
        if not all(choices):  # dropping one would shift the answer index onto another choice
            raise DataError(sample_id, f"an empty choice among {choices}")
        answer_idx = row.get("answer")
        if not isinstance(answer_idx, int) or not 0 <= answer_idx < len(choices):
            raise DataError(sample_id, f"answer index {answer_idx!r} does not name one of "
                            f"{len(choices)} choices")
        letters = "ABCDEFGHIJ"
        if len(choices) > len(letters):
            raise DataError(sample_id, f"{len(choices)} choices; at most {len(letters)} can be lettered")
        # the prompt lists lettered options, so the option's letter is a gold answer too
        answers = [choices[answer_idx], letters[answer_idx]]
        options = " ".join(f"({letters[k]}) {c}" for k, c in enumerate(choices))
        # The hint is the question's context (often what the question refers to, e.g. a passage
        # for "Which word does not rhyme?"): without it such questions are unanswerable.
        hint = row.get("hint")
        context = f"{CONTEXT}{hint.strip()}\n" if isinstance(hint, str) and hint.strip() else ""
        question = f"{context}{question}{OPTIONS}{options}"
    else:
        answers = _texts(row.get(spec.answers), keep_blank=name in VQA_SCORED)
        if not any(answers):
            raise DataError(sample_id, "no gold answers (missing or empty answer list)")
    image = to_rgb(row.get("image"), sample_id, base)
    # Teacher forcing uses the most frequent answer (VQA's 10 annotators, counted as the VQA
    # evaluation compares them); ties keep list order.
    answer = most_common_answer(answers, normalise=name in VQA_SCORED)
    return {"sample_id": sample_id, "image": image, "question": question, "answer": answer,
            "answers": answers, "asked": asked}


class Dataset:
    """A selection of rows of one split, read lazily; ``ds[i]`` is the ``i``-th selected sample.

    Parameters
    ----------
    name, split : str
        Dataset name and split (they make the sample ids ``name/split/row``).
    rows : numpy.ndarray
        Source row numbers, in sample order.
    load : callable
        ``load(row, sample_id) -> dict`` with at least ``image, question, answer, answers``;
        raises :class:`DataError` for a bad sample.
    subset_mode : str
        ``data.subset``, passed to :func:`capture.subsets.label_subset`.
    """

    def __init__(self, name: str, split: str, rows: np.ndarray,
                 load: Callable[[int, str], dict[str, Any]], subset_mode: str = "keywords") -> None:
        self.name, self.split, self.rows = name, split, np.asarray(rows, dtype=np.int64)
        self._load, self.subset_mode = load, subset_mode

    def __len__(self) -> int:
        return len(self.rows)

    def sample_id(self, i: int) -> str:
        """The stable id of sample ``i`` without reading it (``dataset/split/row``)."""
        return f"{self.name}/{self.split}/{int(self.rows[i])}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        from capture.subsets import label_subset

        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = i % len(self)
        sid = self.sample_id(i)
        try:
            sample = self._load(int(self.rows[i]), sid)
        except DataError as err:
            err.index = i
            raise
        # labelled by the question as asked (synthetic samples have only that): ScienceQA's
        # context and options would put their words into the cues
        asked = sample.pop("asked", sample["question"])
        sample.update(index=i, sample_id=sid, subset=label_subset(self.name, asked, self.subset_mode))
        return sample

    def iter_indices(self, indices: Iterable[int]) -> Iterator[dict[str, Any] | DataError]:
        """Yield the samples at ``indices``; a bad sample is yielded as its :class:`DataError`.

        Yielding (not raising) lets a capture shard record the failure and go on.

        Examples
        --------
        >>> ds = open_dataset(DataConfig(name="synthetic", limit=6))
        >>> [s["index"] for s in ds.iter_indices(range(1, 6, 2))]
        [1, 3, 5]
        """
        seen: set[int] = set()
        for i in indices:
            if i in seen:
                raise GapError(f"{self.sample_id(i)}: sample index {i} requested twice")
            seen.add(i)
            try:
                yield self[i]
            except DataError as err:
                yield err


def _select(n_rows: int, cfg: DataConfig, keep: np.ndarray | None = None) -> np.ndarray:
    rows = np.arange(n_rows) if keep is None else np.flatnonzero(keep)
    if cfg.limit is not None and cfg.limit < len(rows):
        if cfg.shuffle:
            pick = np.random.default_rng(cfg.seed).choice(len(rows), cfg.limit, replace=False)
            rows = rows[np.sort(pick)]  # sorted: row-group locality; the set is what is sampled
        else:
            rows = rows[: cfg.limit]
    return rows


def _open_synthetic(cfg: DataConfig) -> Dataset:
    from capture.synthetic import KINDS, SIMPLE_KINDS, make_sample

    spec = (cfg.config_name or "all").strip()
    kinds = {"all": KINDS, "simple": SIMPLE_KINDS}.get(spec)
    if kinds is None:
        kinds = [k.strip() for k in spec.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ConfigError(f"data.config_name {spec!r}: synthetic kinds are 'all', 'simple' or "
                              f"a comma list of {', '.join(KINDS)}")
    n = SYNTHETIC_DEFAULT_ROWS if cfg.limit is None else cfg.limit

    def load(row: int, sample_id: str) -> dict[str, Any]:
        return make_sample(row, cfg.seed, kinds, SYNTHETIC_IMAGE_SIZE, cfg.split)

    return Dataset("synthetic", cfg.split, np.arange(n), load, cfg.subset)


def open_dataset(data_cfg: DataConfig) -> Dataset:
    """Open the configured split for random access (nothing but row counts is read here).

    Parameters
    ----------
    data_cfg : schemas.config.DataConfig
        ``name``; ``path`` (a local directory; None looks in the HF hub cache); ``split``;
        ``config_name`` (hub config, e.g. ``DocVQA``; for ``synthetic``: ``all``, ``simple`` or a
        comma list of kinds); ``limit``; ``shuffle`` + ``seed`` (a seeded sample of ``limit``
        rows instead of the first ones; for ``synthetic`` the seed draws the images instead).

    Returns
    -------
    Dataset
        ``len(ds)``; ``ds[i]`` -> ``dict(index, sample_id, image, question, answer, answers,
        subset)``; ``ds.iter_indices(indices)``.

    Examples
    --------
    >>> ds = open_dataset(DataConfig(name="synthetic", limit=3, config_name="simple"))
    >>> sorted(ds[0])
    ['answer', 'answers', 'image', 'index', 'kind', 'question', 'sample_id', 'subset']
    """
    if data_cfg.name == "synthetic":
        return _open_synthetic(data_cfg)
    spec = SPECS[data_cfg.name]
    config_name = data_cfg.config_name or spec.config
    if data_cfg.path is not None:
        root = Path(data_cfg.path).expanduser()
    else:
        snapshot = hub_cache_snapshot(spec.repo)
        if snapshot is None:
            raise ConfigError(f"data.path is not set and {spec.repo} is not in the HF hub cache; "
                              f"run `gap data stage {data_cfg.name} --to DIR` on a machine with "
                              "internet and set data.path=DIR")
        root = snapshot
    source = _open_source(root, data_cfg.split, config_name)
    _check_columns(source, data_cfg, spec, root)
    keep = None
    if data_cfg.name == "scienceqa":
        # Text-only questions have no visual tokens to study: leave them out, ids unchanged.
        keep = ~source.null_mask("image")
        log.info("scienceqa/%s: %d of %d questions have an image", data_cfg.split,
                 int(keep.sum()), source.n_rows)
    rows = _select(source.n_rows, data_cfg, keep)
    wanted = ("image", spec.question, spec.answers) + (("choices", "hint") if data_cfg.name == "scienceqa" else ())
    columns = [c for c in wanted if c in source.columns]

    def load(row: int, sample_id: str) -> dict[str, Any]:
        try:
            record = source.row(row, columns)
        except (OSError, ValueError) as exc:  # a damaged row group (pyarrow's IO / Invalid)
            raise DataError(sample_id, f"row not readable from {source.file_of(row)} "
                                       f"({str(exc).splitlines()[0]})") from None
        return _row_to_sample(data_cfg.name, spec, record, sample_id, source.base)

    log.info("%s/%s: %d of %d rows selected from %s", data_cfg.name, data_cfg.split, len(rows),
             source.n_rows, root)
    return Dataset(data_cfg.name, data_cfg.split, rows, load, data_cfg.subset)


def _check_columns(source: _Source, cfg: DataConfig, spec: Spec, root: Path) -> None:
    needed = ["image", spec.question, spec.answers]
    if cfg.name == "scienceqa":
        needed.append("choices")
    missing = [c for c in needed if c not in source.columns]
    if missing:
        raise ConfigError(f"data.path {root}: split {cfg.split!r} has no column(s) "
                          f"{', '.join(missing)} expected for {cfg.name} ({spec.repo}); "
                          f"found {', '.join(source.columns)}")
    # Splits whose answers the hub hides have them null (or []) throughout: the first rows tell.
    head_nulls = source.null_mask(spec.answers, head=256) if cfg.name != "scienceqa" else []
    if len(head_nulls) and head_nulls.all():
        hint = " (the hub hides DocVQA test answers): use data.split=validation" \
            if cfg.name == "docvqa" else ""
        raise ConfigError(f"data.split {cfg.split!r} of {cfg.name} has no gold answers{hint}")
