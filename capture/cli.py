"""``gap capture``: run a model over a dataset shard and write activations + interventions to a run.

Exit codes: 0 when every sample of the shard is ``ok`` or failed for a data reason (bad image,
...), also after a stop requested by SIGTERM/SIGUSR1 once the committed work is consistent;
:data:`schemas.run.STOPPED_WITHOUT_PROGRESS` (3) after such a stop that committed no sample in
this process (e.g. the time-limit warning came while the model was loading: a restart would stop
there too);
1 when samples failed for other reasons (NaN/inf, out of memory, a model or intervention error)
or on a user-facing error (one line).  Those failures stay in the store until ``--resume --retry-failed``
captures them again (after lowering ``capture.batch_size``, on a larger GPU, ...).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from schemas.errors import GapError
from schemas.run import STOPPED_WITHOUT_PROGRESS

log = logging.getLogger("gap.capture")

# Above this share of the run spent waiting for the store, the summary calls the run disk-bound.
DISK_BOUND_SHARE = 0.25
PROGRESS_LINE_S = 60.0  # without a bar (a batch job's log): seconds between progress lines

DESCRIPTION = """Run the configured model over the configured dataset and write a run store.

With --shard I/N this process captures rows I, I+N, I+2N, ... of the selection (one Slurm array
task per shard); --resume continues a shard that was stopped, skipping committed samples, and
--retry-failed with it also redoes the samples that failed for a non-data reason (out of memory,
NaN/inf, an intervention error), whose new records replace the failed ones.
SIGTERM or SIGUSR1 (Slurm sends them before the time limit) stop after the current batch; the
committed samples stay valid and a rerun with --resume finishes the shard."""

EXAMPLES = """examples:
  gap capture configs/qwen3_vl_30b_chartqa.yaml --out runs/r1
  gap capture configs/qwen3_vl_30b_chartqa.yaml --out runs/r1 --set data.limit=20 --set capture.layers=[0,12,24]
  gap capture configs/qwen3_vl_30b_chartqa.yaml --out runs/r1 --shard 2/4 --resume
  gap capture configs/qwen3_vl_30b_chartqa.yaml --out runs/r1 --resume --retry-failed --set capture.batch_size=1"""


def build_parser() -> argparse.ArgumentParser:
    """The ``gap capture`` argument parser."""
    p = argparse.ArgumentParser(prog="gap capture", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run configuration (YAML)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to create or continue")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, VALUE parsed as YAML (repeatable)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="capture shard I of N (0-based; default 0/1)")
    p.add_argument("--resume", action="store_true", help="continue a shard that already has committed samples")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: capture again the samples that failed for a non-data reason "
                        "(oom, nonfinite, error)")
    p.add_argument("--retry-failed-before", metavar="TIME", type=_utc_time, default=None,
                   help="with --resume: the same, for the failures committed before TIME (ISO 8601, "
                        "e.g. 2026-11-27T09:00:00+00:00) only; `gap slurm submit --retry-failed` "
                        "passes its submission time, so a requeued task does not redo the failures "
                        "its own submission recorded")
    p.add_argument("--padding-side", choices=("right", "left"), default="right",
                   help="padding of batched prompts (results do not depend on it; default right)")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="cap on padded tokens per batch, besides capture.batch_size")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a progress line after the first sample, then one a minute "
                        "(what a job's log gets anyway)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is happening (INFO)")
    return p


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the capture loop checks it between batches."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after the current batch", self.signal)


def _device_line(loaded: Any, device_map: Any) -> str:
    import torch

    device = loaded.input_device
    if device.type != "cuda":
        return "cpu"
    n = torch.cuda.device_count()
    return f"{torch.cuda.get_device_name(device)} x{n} (device_map={device_map})"


def _estimate(loaded: Any, spec: Any, dataset: Any, todo: list[int]) -> str:
    """One line: bytes per sample from the first few samples' stored token counts."""
    from capture.prompts import encode_sample
    from capture.runner import bytes_per_token, stored_tokens

    per_token = bytes_per_token(spec)
    selection = spec.config.capture.tokens
    lengths = []
    for item in dataset.iter_indices(todo[:4]):
        if isinstance(item, dict):
            try:
                sample = encode_sample(loaded.processor, loaded.image_token_id, item)
                lengths.append(len(stored_tokens(sample, selection)))
            except Exception as exc:  # noqa: BLE001 - the run records it; the estimate skips it
                log.debug("estimate skips %s: %s", item.get("sample_id"), exc)
    if not lengths:
        return "bytes per sample: unknown (no readable sample among the first ones)"
    tokens = sum(lengths) / len(lengths)
    per_sample = tokens * per_token
    which = "" if selection == "all" else f" ({'+'.join(selection)})"
    return (f"activations: {len(spec.layers)} layers x ~{tokens:.0f} tokens{which} x {spec.hidden_size} x "
            f"{spec.hidden_encoding} = {_size(per_sample)} per sample, ~{_size(per_sample * len(todo))} "
            f"for {len(todo)} samples (choose capture.layers and capture.tokens to write less)")


def _size(n_bytes: float) -> str:
    """Human-readable bytes.

    >>> _size(2.5e6), _size(3e9)
    ('2.5 MB', '3.00 GB')
    """
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e3:.1f} kB"


def _store_line(n_bytes: int, elapsed: float, wait: float) -> str:
    """What the store took and how long the model waited for it (the sign of a disk-bound run).

    >>> _store_line(int(2.7e6), 47.0, 0.1)
    'store: 2.7 MB written, 57.4 kB/s; the model waited for it 0% of the time'
    >>> _store_line(int(13e9), 10.0, 6.0)  # doctest: +NORMALIZE_WHITESPACE
    'store: 13.00 GB written, 1.30 GB/s; the model waited for it 60% of the time: disk-bound,
     choose fewer capture.layers / capture.tokens or a faster filesystem to go faster'
    """
    share = wait / max(elapsed, 1e-9)
    line = (f"store: {_size(n_bytes)} written, {_size(n_bytes / max(elapsed, 1e-9))}/s; "
            f"the model waited for it {share:.0%} of the time")
    if share >= DISK_BOUND_SHARE:
        line += (": disk-bound, choose fewer capture.layers / capture.tokens or a faster filesystem "
                 "to go faster")
    return line


def main(argv: list[str]) -> int:
    """Entry point of ``gap capture`` (see ``gap capture --help``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from schemas.config import load_config
    from schemas.run import STATUS_DATA, STATUS_OK, parse_shard, shard_indices

    if (args.retry_failed or args.retry_failed_before) and not args.resume:
        raise GapError("--retry-failed goes with --resume (it redoes failed samples of an existing shard)")
    cfg = load_config(args.config, args.overrides)
    try:
        shard, n_shards = parse_shard(args.shard)
    except ValueError as exc:
        raise GapError(str(exc)) from None
    from store.writer import RunWriter, preflight

    out = Path(args.out)
    # what the run store and the config decide fails now, not after minutes of model loading
    preflight(out, cfg, (shard, n_shards), resume=args.resume)
    stop = StopFlag()
    stop.install()

    from tqdm import tqdm

    from capture.datasets import open_dataset
    from capture.family import load_model
    from capture.runner import CaptureRunner, make_spec

    dataset = open_dataset(cfg.data)
    rows = shard_indices(len(dataset), shard, n_shards)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights")
    loaded = load_model(cfg.model)
    spec = make_spec(cfg, loaded, n_total=len(dataset))
    t0 = time.perf_counter()
    with RunWriter(out, spec, shard=(shard, n_shards), resume=args.resume) as writer:
        retry = _retryable(writer, args.retry_failed, args.retry_failed_before)
        todo = [r for r in rows if r not in writer.committed or r in retry]
        device = _device_line(loaded, cfg.model.device_map)
        print(f"gap capture: {loaded.info['family']} ({loaded.n_layers} layers) on {device}; "
              f"shard {shard}/{n_shards}: {len(todo)} of {len(rows)} samples to do"
              f"{f' ({len(retry)} failed ones again)' if retry else ''} -> {out}")
        if spec.layers and todo:
            print(f"gap capture: {_estimate(loaded, spec, dataset, todo)}")
        with tqdm(total=len(todo), unit="sample", disable=args.no_progress or None, dynamic_ncols=True) as bar:
            with CaptureRunner(loaded, cfg, spec, writer, padding_side=args.padding_side,
                               max_batch_tokens=args.max_batch_tokens,
                               on_record=_progress_callback(bar, writer), should_stop=stop,
                               donor_source=dataset) as runner:
                stats = runner.run(dataset.iter_indices(todo))
    elapsed = time.perf_counter() - t0
    counts = Counter(writer.committed_status.values())  # this shard's latest status per sample
    bad = {k: v for k, v in counts.items() if k not in (STATUS_OK, STATUS_DATA)}
    print(f"gap capture: {stats.n_ok} ok, {stats.n_failed} failed this run "
          f"({', '.join(f'{k} {v}' for k, v in sorted(stats.failures.items())) or 'none'}); "
          f"{stats.n_tokens} tokens in {elapsed:.0f} s")
    if writer.bytes_written:
        print(f"gap capture: {_store_line(writer.bytes_written, elapsed, writer.wait_seconds)}")
    held = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"gap capture: shard {shard}/{n_shards} holds {sum(counts.values())} of {len(rows)} samples"
          + (f": {held}" if held else ""))
    for line in stats.first_errors:
        print(f"  failed: {line}")
    if stats.stopped_early and not (stats.n_ok + stats.n_failed):
        print(f"gap capture: stopped before committing anything ({stop.signal or 'stop requested'}): "
              "raise slurm.time or lower slurm.signal_seconds", file=sys.stderr)
        return STOPPED_WITHOUT_PROGRESS
    if stats.stopped_early:
        print(f"gap capture: stopped early; rerun with --resume to finish shard {shard}/{n_shards} "
              f"({stop.signal or 'stop requested'}; the committed samples are consistent)")
        return 0
    if bad:
        print(f"gap capture: {sum(bad.values())} samples failed for non-data reasons; rerun with "
              "--resume --retry-failed to capture them again", file=sys.stderr)
        return 1
    return 0


def _utc_time(text: str) -> datetime:
    """An ISO 8601 time for ``--retry-failed-before`` (UTC when it names no zone)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time like 2026-11-27T09:00:00+00:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _retryable(writer: Any, every: bool, before: datetime | None) -> set[int]:
    """The committed samples to capture again: failed for a non-data reason, and (with ``before``)
    committed before that time.

    >>> from types import SimpleNamespace
    >>> w = SimpleNamespace(committed_status={1: "oom", 2: "error", 3: "ok", 4: "data_error"},
    ...                     committed_time={1: "2026-11-27T08:00:00+00:00", 2: "2026-11-27T10:00:00+00:00",
    ...                                     3: "2026-11-27T08:00:00+00:00", 4: "2026-11-27T08:00:00+00:00"})
    >>> sorted(_retryable(w, True, None)), sorted(_retryable(w, False, _utc_time("2026-11-27T09:00:00")))
    ([1, 2], [1])
    """
    from schemas.run import RETRYABLE

    if not every and before is None:
        return set()
    return {r for r, status in writer.committed_status.items() if status in RETRYABLE
            and (before is None or datetime.fromisoformat(writer.committed_time[r]) < before)}


def _progress_callback(bar: Any, writer: Any) -> Any:
    """``on_record`` for the runner: advance the bar, show tokens/s and GB written.

    Where no bar is shown (a batch job's log, ``--no-progress``) it prints a progress line
    instead: after the first sample, then every ``PROGRESS_LINE_S`` seconds.
    """
    start = time.perf_counter()
    counts = {"tokens": 0, "done": 0, "failed": 0}
    last_line: list[float | None] = [None]

    def on_record(record: Any) -> None:
        ok = record.status == "ok"
        counts["tokens"] += record.n_tokens if ok else 0
        counts["done"] += 1
        counts["failed"] += not ok
        now = time.perf_counter()
        rate = counts["tokens"] / max(now - start, 1e-9)
        bar.set_postfix_str(f"{rate:.0f} tok/s, {writer.bytes_written / 1e9:.2f} GB", refresh=False)
        bar.update(1)
        if bar.disable and (last_line[0] is None or now - last_line[0] >= PROGRESS_LINE_S):
            last_line[0] = now
            print(f"gap capture: {counts['done']} of {bar.total} samples done ({counts['failed']} failed), "
                  f"{rate:.0f} tok/s, {writer.bytes_written / 1e9:.2f} GB written, {now - start:.0f} s",
                  flush=True)

    return on_record
