"""The capture loop: batches through the model in one nnsight trace each, records to the store.

Samples are read and encoded (chat template, processor) a window ahead of the loop
(:mod:`capture.encode_ahead`: on a GPU in a worker process, else on a thread), so image decoding
and preprocessing overlap the GPU.  Per batch of similar-length samples:

1. one ``nnsight`` trace of the plain forward, whose cache keeps every decoder block's output;
   after it, a per-layer non-finite flag is computed for every real token;
2. the captured layers are copied from those outputs into one host buffer: whole padded layers
   with the default ``capture.tokens="all"`` (each sample's real tokens are sliced out on the
   host), else the stored tokens run by run of consecutive tokens (gathered on the device first
   when scattered); on CUDA the buffer is pinned and the copies run on a side stream, so they
   overlap the next batch's forward (and this batch's interventions);
3. the interventions (``capture.causal.run_causal``, ``capture.truncation.run_truncation``) run
   on the same batch when the config asks for them and fill ``SampleRecord.values``;
4. when the copy's event has fired, one :class:`~schemas.run.SampleRecord` per sample goes to
   the store's background :class:`~store.writer.RunWriter`.

A CUDA out-of-memory error halves the batch and retries; a single sample that still does not fit
is recorded as failed (``oom``). A NaN/inf in a sample's states marks that sample failed
(``nonfinite``) naming the first layer. Data errors (unreadable image, ...) become failed records
(``data_error``) and the shard goes on.

Examples
--------
>>> import tempfile
>>> from schemas.config import config_from_dict
>>> from store.writer import RunWriter
>>> from capture.tiny import build_tiny
>>> from capture.family import load_model
>>> from capture.datasets import open_dataset
>>> path = build_tiny("llava", tempfile.mkdtemp(), n_layers=2)
>>> cfg = config_from_dict({"model": {"path": str(path), "dtype": "float32"},
...                         "data": {"name": "synthetic", "limit": 3}})
>>> loaded = load_model(cfg.model)
>>> ds = open_dataset(cfg.data)
>>> spec = make_spec(cfg, loaded, n_total=len(ds))
>>> with RunWriter(tempfile.mkdtemp() + "/run", spec) as writer:
...     stats = CaptureRunner(loaded, cfg, spec, writer).run(ds.iter_indices(range(len(ds))))
>>> stats.n_ok, stats.n_failed
(3, 0)
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from capture.encode_ahead import EncodeAhead, EncoderProcess
from capture.transfer import host_to_device
from schemas.config import Config, resolve_layers
from schemas.errors import GapError, one_line
from schemas.run import (STATUS_DATA, STATUS_ERROR, STATUS_NONFINITE, STATUS_OK, STATUS_OOM, SampleRecord,
                         failed_record)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from capture.family import LoadedModel
    from capture.prompts import Batch, PromptSample
    from store.writer import RunSpec, RunWriter

log = logging.getLogger("gap.capture")

SWITCH_INTERVAL_S = 5e-4  # while capturing (see CaptureRunner.run)
MAX_ERRORS_IN_A_ROW = 8  # samples failing alone with an error, one after another: stop the shard
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def storage_encoding(cfg: Config) -> str:
    """The run's hidden encoding: the model dtype (lossless), or float16 when asked (lossy)."""
    return "float16" if cfg.capture.store_dtype == "float16" else cfg.model.dtype


def build_coords(cfg: Config, n_layers: int) -> dict[str, list[Any]]:
    """Coordinates of the sample-level variables' non-sample dims for this config.

    >>> from schemas.config import config_from_dict
    >>> cfg = config_from_dict({"model": {"path": "m"}, "capture": {"causal": {"methods": ["zero"],
    ...     "layers": [0, -1]}, "truncation": {"modes": ["knockout"], "layers": [1]}}})
    >>> build_coords(cfg, 4)
    {'layer': [0, 3], 'method': ['zero'], 'channel': ['visual', 'text'], 'trunc_layer': [-1, 1], 'mode': ['knockout']}
    """
    causal, trunc = cfg.capture.causal, cfg.capture.truncation
    coords: dict[str, list[Any]] = {"layer": [], "method": [], "channel": [], "trunc_layer": [], "mode": []}
    if causal.methods:
        coords.update(layer=resolve_layers(causal.layers, n_layers), method=list(causal.methods),
                      channel=list(causal.channels))
    if trunc.modes:
        coords.update(trunc_layer=[-1] + resolve_layers(trunc.layers, n_layers), mode=list(trunc.modes))
    return coords


def make_spec(cfg: Config, loaded: LoadedModel, n_total: int) -> RunSpec:
    """The :class:`store.writer.RunSpec` of a capture run with this config and model."""
    from capture.prompts import prompt_identity
    from store.writer import RunSpec

    layers = resolve_layers(cfg.capture.layers, loaded.n_layers) if cfg.capture.activations else []
    model_info = {**loaded.info, **prompt_identity(loaded.processor)}
    return RunSpec(config=cfg, model_info=model_info, layers=layers, hidden_size=loaded.hidden_size,
                   hidden_encoding=storage_encoding(cfg), coords=build_coords(cfg, loaded.n_layers),
                   n_total=n_total)


def stored_tokens(sample: PromptSample, tokens: str | list[str]) -> np.ndarray:
    """Indices of the sample's tokens whose activations are stored (``capture.tokens``), ascending.

    ``other`` is every token that is neither visual, question text nor answer (chat template,
    system prompt, BOS).

    >>> from types import SimpleNamespace as S
    >>> s = S(n_tokens=6, is_visual=np.array([0, 1, 1, 0, 0, 0], bool),
    ...       is_text=np.array([0, 0, 0, 1, 0, 0], bool), is_answer=np.array([0, 0, 0, 0, 0, 1], bool))
    >>> stored_tokens(s, ["visual", "answer"]).tolist(), stored_tokens(s, ["other"]).tolist()
    ([1, 2, 5], [0, 4])
    >>> stored_tokens(s, "all").tolist()
    [0, 1, 2, 3, 4, 5]
    """
    if tokens == "all":
        return np.arange(sample.n_tokens)
    sets = {"visual": sample.is_visual, "text": sample.is_text, "answer": sample.is_answer}
    sets["other"] = ~(sample.is_visual | sample.is_text | sample.is_answer)
    keep = np.zeros(sample.n_tokens, bool)
    for name in tokens:
        keep |= sets[name]
    return np.flatnonzero(keep)


def bytes_per_token(spec: RunSpec) -> int:
    """Bytes of ``hidden`` one token adds to the store (all captured layers)."""
    return len(spec.layers) * spec.hidden_size * ITEMSIZE[spec.hidden_encoding]


@dataclass
class CaptureStats:
    """Counters of one capture shard (the CLI's progress line and summary)."""

    n_ok: int = 0
    n_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # status -> count
    first_errors: list[str] = field(default_factory=list)  # a few one-line reasons
    n_tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    def add_failure(self, record: SampleRecord) -> None:
        self.n_failed += 1
        self.failures[record.status] = self.failures.get(record.status, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{record.sample_id}: {record.error}")

    @property
    def n_bad(self) -> int:
        """Failures that are not data errors (these make the exit code non-zero)."""
        return self.n_failed - self.failures.get(STATUS_DATA, 0)


MAX_RUNS_PER_SAMPLE = 8  # runs of consecutive stored rows per sample copied one by one


def row_runs(rows: np.ndarray) -> np.ndarray:
    """``(source row, destination row, length)`` of each run of consecutive values of ``rows``
    (ascending), destinations counting from 0 in order: how to copy ``x[rows]`` run by run.

    >>> row_runs(np.array([3, 4, 5, 9, 10, 20])).tolist()
    [[3, 0, 3], [9, 3, 2], [20, 5, 1]]
    """
    if rows.size == 0:
        return np.zeros((0, 3), np.int64)
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
    lengths = np.diff(np.concatenate([firsts, [rows.size]]))
    return np.stack([rows[firsts], firsts, lengths], axis=1)


@dataclass
class _StoredRows:
    """A batch's stored states where the forward left them: ``sources`` are ``(slot, rows)``
    pairs (a captured layer's block output as ``(B * T, hidden)``, or its rows already gathered),
    and run ``(s, d, n)`` of ``runs`` puts ``rows[s:s + n]`` at host rows ``d:d + n``."""

    shape: tuple[int, int, int]
    dtype: Any
    sources: list[tuple[int, Any]]
    runs: np.ndarray

    def copy_into(self, dest: torch.Tensor, stream: Any = None) -> None:
        """Copy every run into ``dest`` ``(n_captured, rows, hidden)``; asynchronously on
        ``stream`` when given (a CUDA side stream)."""
        runs = self.runs.tolist()
        for slot, rows in self.sources:
            for s, d, n in runs:
                dest[slot, d:d + n].copy_(rows[s:s + n], non_blocking=stream is not None)
            if stream is not None:
                # made on the compute stream; keep its memory until the side stream has copied it
                rows.record_stream(stream)


@dataclass
class _InFlight:
    """A batch whose forward is done and whose host copy may still be running.

    ``host`` holds ``hidden`` (the captured layers' states; each sample's stored tokens are
    consecutive there), ``bad`` (per-layer non-finite flags of every real token), ``logp`` (clean
    answer log-prob per row) and ``overflow`` (float16 clip counts).
    """

    samples: list[PromptSample]
    starts: list[int]  # sample i's first token along ``bad``'s token axis (every real token)
    kept: list[np.ndarray]  # sample i's stored tokens (indices into its own tokens)
    kept_starts: list[int]  # where they begin along the host ``hidden``'s token axis
    host: dict[str, Any]
    values: list[dict[str, Any]]
    event: Any  # torch.cuda.Event, or None on CPU
    errors: list[str]  # per-sample intervention error ("" when fine)


class _ItemEncoder:
    """Item -> its encoded prompt, or the failed record of a bad item (run ahead of the loop, on
    a thread or in the encoder process; picklable for the latter)."""

    def __init__(self, processor: Any, image_token_id: int) -> None:
        self.processor, self.image_token_id = processor, image_token_id

    def __call__(self, item: Any) -> PromptSample | SampleRecord:
        from capture.prompts import encode_sample

        if isinstance(item, BaseException):  # capture.datasets.DataError
            index = getattr(item, "index", None)
            return failed_record(-1 if index is None else int(index), str(getattr(item, "sample_id", "?")),
                                 getattr(item, "reason", one_line(item)), status=STATUS_DATA)
        try:
            return encode_sample(self.processor, self.image_token_id, item)
        # processors raise anything (PIL, numpy, ValueError) on a bad image: this sample only;
        # a GapError (the processor or template against this text) is retryable, and counted
        except Exception as exc:  # noqa: BLE001
            status = STATUS_ERROR if isinstance(exc, GapError) else STATUS_DATA
            return failed_record(int(item.get("index", -1)), str(item.get("sample_id", "?")),
                                 one_line(exc), status=status, **_meta_fields(item))


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class CaptureRunner:
    """Run capture for one shard's samples and hand records to ``writer``.

    Parameters
    ----------
    loaded
        The model (:func:`capture.family.load_model`).
    cfg
        The run config (layers, batch size, interventions).
    spec
        The run's :class:`store.writer.RunSpec` (:func:`make_spec`).
    writer
        An open :class:`store.writer.RunWriter` (or anything with ``put(record)``).
    padding_side
        ``right`` (default) or ``left``; masks and stored states do not depend on it.
    max_batch_tokens
        Cap on padded tokens per batch (None: only ``capture.batch_size`` limits a batch).
    on_record
        Called with every record after it is queued (progress display).
    should_stop
        Checked between batches; when it returns True the loop stops after the current batch.
    donor_source
        The whole selection (``len`` and ``[i]`` -> sample dict, e.g. a
        :class:`capture.datasets.Dataset`): where ``swap`` patching reads each sample's donor.
    encode_in_process
        Run the processor in a worker process (:mod:`capture.encode_ahead`) instead of on a
        thread of this one; None (default): when the model is on a GPU, where the loop must not
        wait for the GIL. The process starts here (seconds) and ends with :meth:`close`; if it
        does not start, or dies, the thread encodes instead (with a warning).

    Examples
    --------
    See the module docstring.
    """

    def __init__(self, loaded: LoadedModel, cfg: Config, spec: RunSpec, writer: RunWriter, *,
                 padding_side: str = "right", max_batch_tokens: int | None = None,
                 on_record: Callable[[SampleRecord], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, donor_source: Any = None,
                 encode_in_process: bool | None = None) -> None:
        import nnsight
        import torch

        if getattr(loaded.processor, "chat_template", None) is None:
            raise GapError(f"model.path {loaded.info.get('path')}: the processor has no chat template")
        if "knockout" in cfg.capture.truncation.modes:  # before any work, not once per sample
            from capture.attention import check_attention_implementation

            check_attention_implementation(loaded.model)
        self.loaded, self.cfg, self.spec, self.writer = loaded, cfg, spec, writer
        self.padding_side, self.max_batch_tokens = padding_side, max_batch_tokens
        self.on_record = on_record or (lambda record: None)
        self.should_stop = should_stop or (lambda: False)
        self.donor_source = donor_source
        self.envoy = nnsight.NNsight(loaded.model)
        self.device = loaded.input_device
        # where the LM head's input is sliced to the scored positions (the final norm's output); a
        # norm offloaded by accelerate (weights on "meta") takes them from the CPU, as any device can
        norm_device = loaded.final_norm().weight.device
        self.scored_device = norm_device if norm_device.type == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.layer_slot = {layer: j for j, layer in enumerate(spec.layers)}
        self.stats = CaptureStats()
        self._batches_since_gc = 0
        self._errors_in_a_row = 0
        self._encode_errors_in_a_row = 0
        self._encoder_process = None
        if self.cuda if encode_in_process is None else encode_in_process:
            log.info("starting the encoder process")
            try:
                self._encoder_process = EncoderProcess(_ItemEncoder(loaded.processor, loaded.image_token_id))
            except Exception as exc:  # noqa: BLE001 - the thread does the same work, only slower
                log.warning("the encoder process did not start (%s); encoding on a thread", one_line(exc))
            else:  # a runner dropped without close() still ends its process
                self._finalizer = weakref.finalize(self, self._encoder_process.close)

    def __enter__(self) -> CaptureRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the encoder process, if any (a later :meth:`run` encodes on a thread)."""
        if self._encoder_process is not None:
            self._finalizer()
            self._encoder_process = None

    # -- public ---------------------------------------------------------------------------------
    def run(self, items: Iterable[Any], window: int | None = None) -> CaptureStats:
        """Capture every item (a dataset sample dict, or a ``DataError`` for a bad one).

        Items are read ``window`` at a time (default ``8 x batch_size``), encoded, grouped by
        length into batches and captured; stops early when ``should_stop()`` turns True.
        """
        # The writer's threads spend their time in system calls and must take the GIL back after
        # each one; the Python-heavy trace holds it for up to a whole switch interval (5 ms by
        # default) each time, enough to starve the writer of an all-layer capture.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        try:
            return self._run(items, window)
        finally:
            sys.setswitchinterval(interval)

    def _run(self, items: Iterable[Any], window: int | None) -> CaptureStats:
        from capture.prompts import length_batches

        start = time.perf_counter()
        window = window or 8 * self.cfg.capture.batch_size
        pending: _InFlight | None = None
        # Items are read and encoded a window ahead, with a processor of their own (the loop's
        # donors use the model's): the loop itself only feeds the GPU.
        ahead = EncodeAhead(items, _ItemEncoder(copy.deepcopy(self.loaded.processor), self.loaded.image_token_id),
                            depth=window, process=self._encoder_process)
        exhausted = False
        try:
            while not exhausted and not self.stats.stopped_early:
                buffer: list[PromptSample] = []
                while len(buffer) < window:
                    encoded = next(ahead, None)
                    if encoded is None:
                        exhausted = True
                        break
                    if isinstance(encoded, SampleRecord):  # the item was bad: recorded, not captured
                        self._put(encoded)
                        if encoded.status == STATUS_ERROR:
                            self._encode_errors_in_a_row += 1
                            self._stop_if_in_a_row(self._encode_errors_in_a_row, "processor",
                                                   encoded.sample_id, encoded.error)
                    else:
                        self._encode_errors_in_a_row = 0
                        buffer.append(encoded)
                groups = length_batches([s.n_tokens for s in buffer], self.cfg.capture.batch_size,
                                        self.max_batch_tokens)
                for group in groups:
                    if self.should_stop():
                        self.stats.stopped_early = True
                        break
                    for flight in self._process([buffer[i] for i in group]):
                        done, pending = pending, flight
                        if done is not None:
                            self._finish(done)
        except BaseException:
            # stopped by an error or an interrupt: the batch already captured still reaches the store
            if pending is not None:
                done, pending = pending, None
                self._store_before_raising([done])
            raise
        finally:
            ahead.close()
        if pending is not None:
            self._finish(pending)
        self.stats.seconds = time.perf_counter() - start
        return self.stats

    # -- steps ----------------------------------------------------------------------------------
    def _process(self, samples: list[PromptSample]) -> list[_InFlight]:
        """Forward + copy + interventions for one batch.

        A failing batch is halved and retried (CUDA OOM, or any error of the model on one of its
        samples); a sample that fails alone is recorded failed (``oom`` / ``error``) and the shard
        goes on, unless ``MAX_ERRORS_IN_A_ROW`` samples in a row fail alone with an error: then
        the model or config is at fault, not the samples, and :class:`GapError` stops the shard.
        """
        import torch

        try:
            flight = self._forward(samples)
            self._errors_in_a_row = 0
            return [flight]
        except GapError:  # the run's own setup is wrong (a config that cannot work): stop now
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, this batch only
            error = exc
        oom = _is_oom(error)
        if oom:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        if len(samples) > 1:
            half = len(samples) // 2
            log.warning("%s with a batch of %d; retrying as %d + %d",
                        "CUDA out of memory" if oom else one_line(error), len(samples), half, len(samples) - half)
            first = self._process(samples[:half])
            try:
                return first + self._process(samples[half:])
            except BaseException:  # the shard stops in the second half: keep the first half's work
                self._store_before_raising(first)
                raise
        s = samples[0]
        if oom:
            self._put(self._failed(s, STATUS_OOM, f"CUDA out of memory with {s.n_tokens} tokens alone"))
            return []
        log.warning("sample %s failed: %s", s.meta["sample_id"], one_line(error),
                    exc_info=log.isEnabledFor(logging.DEBUG))
        self._put(self._failed(s, STATUS_ERROR, one_line(error)))
        self._errors_in_a_row += 1
        self._stop_if_in_a_row(self._errors_in_a_row, "model", s.meta["sample_id"], one_line(error))
        return []

    def _store_before_raising(self, flights: list[_InFlight]) -> None:
        """Store captured batches while an error is on its way out (which matters more)."""
        for flight in flights:
            try:
                self._finish(flight)
            except Exception as exc:  # noqa: BLE001
                log.warning("a captured batch could not be stored: %s", one_line(exc))

    @staticmethod
    def _stop_if_in_a_row(n: int, what: str, sample_id: str, error: str) -> None:
        """After ``MAX_ERRORS_IN_A_ROW`` samples failing one after another the setup is at fault."""
        if n >= MAX_ERRORS_IN_A_ROW:
            raise GapError(f"the {what} failed on {n} samples in a row (last, {sample_id}: {error}); "
                           "stopping: a model or config problem, not bad samples (the records so far "
                           "are committed)")

    def _forward(self, samples: list[PromptSample]) -> _InFlight:
        import torch

        from capture.prompts import collate
        from capture.scoring import answer_logprob

        loaded, spec = self.loaded, self.spec
        host_batch = collate(samples, loaded.pad_token_id, self.padding_side)
        # Queued copies (capture.transfer): from here until the next batch's forward nothing waits
        # for this batch's, so its records, the next collation and trace set-up overlap the GPU.
        batch = host_batch.to(self.device, queued=True)
        width = batch.seq_len
        starts = list(np.cumsum([0] + batch.lengths[:-1]))
        kept = [stored_tokens(s, self.cfg.capture.tokens) for s in samples]
        kept_starts = list(np.cumsum([0] + [len(k) for k in kept[:-1]]))
        # Flat (row * T + column) indices of the real tokens and of the stored ones, sample after
        # sample; with the default capture.tokens="all" they are the same.
        index = host_to_device(torch.cat([torch.arange(batch.offsets[i], batch.offsets[i] + n) + i * width
                                          for i, n in enumerate(batch.lengths)]), self.device)
        keep_rows = np.concatenate([k + batch.offsets[i] + i * width for i, k in enumerate(kept)])
        n_real, hidden = int(index.numel()), loaded.hidden_size
        gather = False
        if self.cfg.capture.tokens == "all":
            # whole padded layers go to the host, one copy each (length batching keeps the padding
            # small); each sample's rows are sliced out there
            n_host = len(samples) * width
            runs = np.array([[0, 0, n_host]])
            host_starts = [i * width + batch.offsets[i] for i in range(len(samples))]
        else:
            n_host, host_starts, runs = len(keep_rows), kept_starts, row_runs(keep_rows)
            # scattered stored rows are gathered on the device first: one copy, not many
            if len(runs) > MAX_RUNS_PER_SAMPLE * len(samples):
                gather, runs = True, np.array([[0, 0, n_host]])
        dtype = loaded.model.get_input_embeddings().weight.dtype
        to_float16 = spec.hidden_encoding == "float16" and dtype != torch.float16
        keep = host_to_device(torch.from_numpy(keep_rows), self.device) if gather or to_float16 else None
        # per flat row: how many of its values float16 clips, over the captured layers
        overflow = (torch.zeros(len(samples) * width, dtype=torch.int64, device=self.device)
                    if to_float16 else None)
        sources: list[tuple[int, torch.Tensor]] = []
        bad = torch.empty((loaded.n_layers, n_real), dtype=torch.bool, device=self.device)
        slot = self.layer_slot
        blocks = loaded.layer_envoys(self.envoy)
        with torch.no_grad():
            # The blocks' outputs are recorded by the trace's cache and read after it.  Reading
            # each block's `.output` in the trace body costs a handoff between the model and the
            # body at every block: 0.4-0.7 ms apiece on an H100 host, measured as 7 ms per sample
            # on a 7B forward of 30 ms and 16 ms on a 30B-A3B forward of 86 ms.  The cache holds
            # every block's output until the loop below, as output_hidden_states would; their
            # stored rows go to the host straight from there (no device copy of them is made).
            # No KV cache: one forward does not need it (~0.5 MB per token).  The LM head projects
            # only the positions that score an answer (logits of all T would be B x T x V).
            answer_mask, scored = self._scored(host_batch)
            keep_logits = 1 if scored is None else host_to_device(scored, self.scored_device)
            with self.envoy.trace(**loaded.forward_inputs(batch.inputs), use_cache=False,
                                  logits_to_keep=keep_logits) as tracer:
                outputs = tracer.cache(modules=blocks, device=None)
                logits = self.envoy.output.logits.save()
            for layer, block in enumerate(blocks):
                flat = outputs[block.path].output.reshape(-1, hidden)
                # every real token is checked, stored or not (a NaN spreads through attention).
                # A row sum is NaN/inf iff the row holds one (or overflows, ~1e38, summed in
                # float32 whatever the model's dtype: float16 sums would overflow at 65504): a
                # cheap reduction instead of a full-size isfinite mask, read once, padding included
                sums = flat.sum(dim=-1, dtype=torch.float32).index_select(0, index.to(flat.device))
                bad[layer] = ~torch.isfinite(sums).to(self.device)
                if layer not in slot:
                    continue
                rows = flat
                if to_float16:
                    limit = torch.finfo(torch.float16).max
                    overflow += (flat.abs() > limit).sum(dim=-1).to(self.device)
                    rows = flat.clamp(-limit, limit).to(torch.float16)
                if gather:
                    rows = rows.index_select(0, keep.to(rows.device))
                sources.append((slot[layer], rows.to(self.device)))  # from another GPU under device_map="auto"
            del outputs, flat
            # onto the input device: the async copy runs on that device's copy stream
            logp = None if scored is None else answer_logprob(
                logits, host_batch.inputs["input_ids"], answer_mask, scored).to(self.device)
            small: dict[str, Any] = {"bad": bad, "logp": logp}
            if to_float16 and spec.layers:
                per_token = overflow.index_select(0, keep)
                small["overflow"] = torch.stack([per_token[a:a + len(k)].sum()
                                                 for a, k in zip(kept_starts, kept)])
            stored = _StoredRows(shape=(len(spec.layers), n_host, hidden), sources=sources, runs=runs,
                                 dtype=torch.float16 if to_float16 else dtype) if spec.layers else None
            host, event = self._to_host(small, stored)
            values, errors = self._interventions(batch)
        self._batches_since_gc += 1
        if self.cuda and self._batches_since_gc >= 50:
            gc.collect()  # repeated traces keep graph objects alive (TOOLING.md)
            self._batches_since_gc = 0
        return _InFlight(samples=samples, starts=starts, kept=kept, kept_starts=host_starts, host=host,
                         values=values, event=event, errors=errors)

    @staticmethod
    def _scored(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's ``(B, T)`` answer mask and the positions whose logits score it (None:
        no answers)."""
        import torch

        from capture.scoring import scored_positions

        mask = torch.zeros(batch.inputs["input_ids"].shape, dtype=torch.bool)
        for i, s in enumerate(batch.samples):
            mask[i, batch.token_slice(i)] = torch.from_numpy(s.is_answer)
        # found on the CPU, where nothing waits for the GPU; the positions reach the LM head's
        # device as a queued copy
        return mask, scored_positions(mask) if bool(mask.any()) else None

    def _to_host(self, tensors: dict[str, Any], stored: _StoredRows | None) -> tuple[dict[str, Any], Any]:
        """Start the device -> host copies; returns the host tensors (``hidden`` assembled from
        ``stored``) and the event to wait for.

        Nothing here waits for the GPU, so the copies overlap whatever is queued next.
        """
        import torch

        host: dict[str, Any] = {}
        if stored is not None:
            host["hidden"] = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=self.cuda)
        if not self.cuda:
            if stored is not None:
                stored.copy_into(host["hidden"])
            return {**tensors, **host}, None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            if stored is not None:
                stored.copy_into(host["hidden"], self.copy_stream)
            for name, tensor in tensors.items():
                if tensor is None or tensor.device.type != "cuda":
                    host[name] = tensor
                    continue
                host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host[name].copy_(tensor, non_blocking=True)
                # made on the compute stream; keep its memory until this stream is done with it
                tensor.record_stream(self.copy_stream)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return host, done

    def _interventions(self, batch: Batch) -> tuple[list[dict[str, Any]], list[str]]:
        """The hook where causal tracing and truncation fill ``SampleRecord.values``."""
        n = len(batch)
        values: list[dict[str, Any]] = [{} for _ in range(n)]
        errors = [""] * n
        errors_partial = [""] * n
        capture_cfg, coords = self.cfg.capture, self.spec.coords
        hooks = []
        if capture_cfg.causal.methods:
            from capture import causal

            donors = self._donors(batch) if "swap" in capture_cfg.causal.methods else None
            hooks.append(lambda: causal.run_causal(self.loaded, batch, capture_cfg.causal, coords=coords,
                                                   donors=donors, envoy=self.envoy))
        if capture_cfg.truncation.modes:
            from capture import truncation

            hooks.append(lambda: truncation.run_truncation(self.loaded, batch, capture_cfg.truncation,
                                                           coords=coords, envoy=self.envoy))
        for hook in hooks:
            try:
                for i, extra in enumerate(hook()):
                    # a hook reports partly failed variants (NaN values) as a one-line `error`
                    note = extra.pop("error", "")
                    if note:
                        errors_partial[i] = "; ".join(filter(None, [errors_partial[i], note]))
                    values[i].update(extra)
            except Exception as exc:
                if _is_oom(exc) or isinstance(exc, GapError):
                    raise  # _process halves the batch; a setup error stops the shard
                log.exception("intervention failed for a batch of %d", n)
                errors = [one_line(exc)] * n
        for i, note in enumerate(errors_partial):
            if note:
                values[i]["error"] = note
        return values, errors

    def _donors(self, batch: Batch) -> list[PromptSample | None]:
        """Each sample's swap donor (``capture.causal.donor_rows``), encoded with its own answer.

        An unreadable donor row, or one showing the sample's own image, is the donor's fault, not
        the sample's: the next candidate stands in, and with none left the sample's swaps are NaN
        (``swap_donor`` empty).
        """
        from capture.causal import donor_rows, same_image
        from capture.prompts import encode_sample

        if self.donor_source is None:
            raise GapError("causal method 'swap' needs the dataset to read donors from")
        out: list[PromptSample | None] = []
        for s in batch.samples:
            donor = None
            for row in donor_rows(int(s.meta["index"]), len(self.donor_source), self.cfg.capture.causal.seed):
                try:
                    candidate = encode_sample(self.loaded.processor, self.loaded.image_token_id,
                                              self.donor_source[row])
                except Exception as exc:  # noqa: BLE001 - try the next candidate
                    log.warning("swap donor %s of %s unusable: %s", row, s.meta["sample_id"], one_line(exc))
                    continue
                if same_image(s, candidate):
                    log.info("swap donor %s of %s shows the same image; trying the next", row, s.meta["sample_id"])
                    continue
                donor = candidate
                break
            if donor is None:
                log.warning("%s: no usable swap donor (unreadable or showing its own image); its swap "
                            "values are NaN", s.meta["sample_id"])
            out.append(donor)
        return out

    def _finish(self, flight: _InFlight) -> None:
        """Wait for the host copy, build one record per sample, hand them to the writer."""
        if flight.event is not None:
            flight.event.synchronize()
        spec, host = self.spec, flight.host
        for i, s in enumerate(flight.samples):
            a, n = flight.starts[i], s.n_tokens
            nonfinite = np.flatnonzero(host["bad"][:, a:a + n].any(dim=1).numpy())
            values = dict(flight.values[i])
            # run_causal scores the clean pass per sample, unpadded, like its patched runs; delta is
            # computed against that value, so the batched one only fills in when it is absent.
            if "logp_clean" not in values and host["logp"] is not None and s.answer_ids.size:
                values["logp_clean"] = float(host["logp"][i])
            if host.get("overflow") is not None:
                values["fp16_overflow"] = int(host["overflow"][i])
            if nonfinite.size:
                first = int(nonfinite[0])
                record = self._failed(s, STATUS_NONFINITE, f"NaN/inf in the hidden states from layer {first}")
                record.values["nonfinite_layer"] = first
            elif flight.errors[i]:
                record = self._failed(s, STATUS_ERROR, flight.errors[i])
            else:
                note = values.pop("error", "")
                keep = flight.kept[i]
                record = self._record(s, values, keep)
                if note:  # some variants failed: keep their NaNs and the rest, flag the sample
                    record.status, record.error = STATUS_ERROR, note
                elif spec.layers:
                    k = flight.kept_starts[i]
                    record.hidden = _to_numpy(host["hidden"][:, k:k + len(keep)], spec.hidden_encoding)
            self._put(record)

    # -- records --------------------------------------------------------------------------------
    def _record(self, s: PromptSample, values: dict[str, Any], keep: np.ndarray) -> SampleRecord:
        """The sample's record with only its stored tokens (``keep``); positions stay the true ones."""
        token = {name: getattr(s, name)[keep]
                 for name in ("input_ids", "position", "is_visual", "is_text", "is_answer")}
        return SampleRecord(index=int(s.meta["index"]), sample_id=str(s.meta["sample_id"]),
                            status=STATUS_OK, values=values, **token, **_meta_fields(s.meta))

    def _failed(self, s: PromptSample, status: str, error: str) -> SampleRecord:
        return failed_record(int(s.meta["index"]), str(s.meta["sample_id"]), error, status=status,
                             input_ids=s.input_ids, **_meta_fields(s.meta))

    def _put(self, record: SampleRecord) -> None:
        self.writer.put(record)
        if record.status == STATUS_OK:
            self.stats.n_ok += 1
            self.stats.n_tokens += record.n_tokens
        else:
            self.stats.add_failure(record)
        self.on_record(record)


def _meta_fields(meta: dict[str, Any]) -> dict[str, Any]:
    answers = meta.get("answers")
    return {"question": str(meta.get("question") or ""), "answer": str(meta.get("answer") or ""),
            "answers": [str(a) for a in answers] if answers else [], "subset": str(meta.get("subset") or "")}


def _to_numpy(host: torch.Tensor, encoding: str) -> np.ndarray:
    """A host tensor in the store's encoding (bfloat16 travels as its uint16 bit pattern)."""
    import torch

    if encoding == "bfloat16":
        return host.view(torch.int16).numpy().view(np.uint16)
    return host.numpy()
