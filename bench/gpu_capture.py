"""Capture overhead on a GPU for LLaVA-1.5-7B and Qwen3-VL-30B-A3B shapes (random bf16 weights).

One command for the device machine (an H100, under 8 minutes)::

    python -m bench.gpu_capture            # real shapes on cuda
    python -m bench.gpu_capture --smoke    # tiny shapes on CPU: checks the script itself

For each shape it builds the model from a config with the real dimensions directly on the GPU
(no checkpoint: random weights, bf16), a processor with the real image geometry (576 visual
tokens) and a word-level tokenizer, and ~640-token samples. Then, alternating, it times:

- ``plain``: the same samples encoded, collated and run through ``model(...)`` (no capture),
  before nnsight ever wraps the model; encoding runs on the loop's thread there, while the capture
  reads ahead on a thread and encodes in a worker process (``encode_collate_ms`` says what that
  is worth);
- ``capture``: :class:`capture.runner.CaptureRunner` writing every layer x every token to a
  run store on local disk (nnsight trace, device gather, pinned async copy, writer threads);
  its LM head projects only the positions that score the answer, where ``model(...)`` projects
  all (2% of a 7B forward's FLOPs, 9% of a 30B-A3B's active ones: a 152k vocabulary);
- ``trace_only``: the same capture with ``capture.activations=false`` (nnsight trace, checks and
  records; no gather, host copy or block write), to tell the trace's cost from the store's;
- ``memfs``: the capture again with the run store on ``/dev/shm`` (RAM, where fsync costs
  nothing): the tool's own overhead when storage keeps up, as a fast parallel filesystem would;
  then once with the processor on a thread of the capture's process instead of its worker
  process (``memfs_thread_encode_ms``: what the process saves the GIL-bound loop);
- the disk: raw ``write`` of the same number of bytes (page cache, from as many threads as the
  store writes with) and the same with ``fsync`` (the sustained device speed).

Figures: ``gpu_capture_overhead_<m>`` = capture / plain; ``gpu_capture_vs_limit_<m>`` = capture /
max(plain, bytes / raw fsynced write speed), the physical limit of TOOLING.md measured in the same
run (the store fsyncs its blocks before committing them, and a long run goes at the disk's speed
whatever it does once the page cache is full);
``gpu_capture_overhead_<m>_vs_forward`` = capture / the forwards alone (already encoded batches);
``gpu_capture_overhead_<m>_memfs`` = memfs / plain; the peak GPU memory of plain and of capture
(weights included); plus per-sample milliseconds, GB/s and the
time the loop waited for the store (``RunWriter.wait_seconds``). If the MoE model does not fit, it is rebuilt with fewer
layers and ``gpu_capture_qwen3moe_layers`` says how many. Last, ``gpu_causal_sweep_speedup``:
the all-layer causal sweep of :func:`bench.bench_causal.gpu_figures` (``--no-causal`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

WORDS = ["what", "is", "the", "value", "of", "the", "red", "bar", "in", "the", "chart", "and",
         "how", "many", "square", "are", "there", "on", "the", "left", "top", "which", "colour",
         "is", "the", "circle"]


def _llava_config(tok: Any, smoke: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if smoke:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    else:  # llava-hf/llava-1.5-7b-hf
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32)
    side = 56 if smoke else 336
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=side, patch_size=14, projection_dim=768, **vision),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                pad_token_id=tok.pad_token_id, **text),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(side // 14) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)


def _qwen3moe_config(tok: Any, smoke: bool, n_layers: int | None) -> Any:
    from transformers import Qwen3VLMoeConfig

    from capture.tiny import qwen_token_ids

    if smoke:
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        section = [4, 2, 2]
    else:  # Qwen/Qwen3-VL-30B-A3B-Instruct
        text = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                    head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
        vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                      num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
        section = [24, 20, 20]
    if n_layers:
        text["num_hidden_layers"] = n_layers
    text.update(vocab_size=151936, intermediate_size=6144, decoder_sparse_step=1, rms_norm_eps=1e-6,
                max_position_embeddings=262144, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision.update(out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **qwen_token_ids(tok))


def _build(name: str, smoke: bool, device: str, n_layers: int | None = None) -> Any:
    """A LoadedModel of random bf16 weights built on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText

    from capture.family import wrap_model
    from capture.tiny import build_processor

    if name == "llava":
        processor = build_processor("llava", WORDS, image_size=56 if smoke else 336)
        config = _llava_config(processor.tokenizer, smoke)
    else:
        processor = build_processor("qwen3_vl_moe", WORDS, image_size=64 if smoke else 768)
        config = _qwen3moe_config(processor.tokenizer, smoke, n_layers)
    dtype = torch.float32 if smoke else torch.bfloat16
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    return wrap_model(model, processor, path=f"<random {name} shape>", attn_implementation="sdpa")


def _samples(n: int, smoke: bool, name: str, n_text: int = 60) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    side = (56 if name == "llava" else 64) if smoke else (336 if name == "llava" else 768)
    rng = np.random.default_rng(0)
    question = " ".join(WORDS[i % len(WORDS)] for i in range(n_text))
    return [{"index": i, "sample_id": f"bench/{i}", "question": question, "answer": "red bar",
             "image": Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))}
            for i in range(n)]


def _sync(loaded: Any) -> None:
    import torch

    if loaded.input_device.type == "cuda":
        torch.cuda.synchronize()


def time_plain(loaded: Any, samples: list[dict[str, Any]], batch_size: int) -> tuple[float, float]:
    """Seconds for encode + collate + forward of ``samples`` without capture, and for the
    forwards alone."""
    import torch

    from capture.prompts import collate, encode_sample, length_batches

    _sync(loaded)
    start = time.perf_counter()
    encoded = [encode_sample(loaded.processor, loaded.image_token_id, s) for s in samples]
    forward = 0.0
    for group in length_batches([e.n_tokens for e in encoded], batch_size):
        batch = collate([encoded[i] for i in group], loaded.pad_token_id).to(loaded.input_device)
        _sync(loaded)
        t = time.perf_counter()
        with torch.no_grad():
            loaded.model(**loaded.forward_inputs(batch.inputs), use_cache=False)
        _sync(loaded)
        forward += time.perf_counter() - t
    return time.perf_counter() - start, forward


def time_capture(loaded: Any, samples: list[dict[str, Any]], batch_size: int, run: Path,
                 activations: bool = True, encode_in_process: bool | None = None) -> tuple[float, int, int, float]:
    """Seconds to capture every layer into a fresh run (final flush included), bytes, n ok, and
    the seconds of it the loop waited for the store.

    With ``activations=False`` only the traced forward, its checks and the per-sample records
    run: the capture's cost without the device gather, host copies and block writes.
    ``encode_in_process`` is :class:`capture.runner.CaptureRunner`'s (None: its default).
    """
    from capture.runner import CaptureRunner, make_spec
    from schemas.config import config_from_dict
    from store.writer import RunWriter

    cfg = config_from_dict({"model": {"path": loaded.info["path"], "dtype": loaded.info["dtype"]},
                            "capture": {"batch_size": batch_size, "activations": activations}})
    spec = make_spec(cfg, loaded, n_total=len(samples))
    writer = RunWriter(run, spec)
    # started before the timing: a GPU runner's encoder process (seconds, once per shard)
    runner = CaptureRunner(loaded, cfg, spec, writer, encode_in_process=encode_in_process)
    _sync(loaded)
    start = time.perf_counter()
    try:
        stats = runner.run(samples)
        _sync(loaded)
    finally:
        writer.close()
        runner.close()
    return time.perf_counter() - start, writer.bytes_written, stats.n_ok, writer.wait_seconds


def _disk(directory: Path, n_bytes: int) -> tuple[float, float]:
    """Raw write speed (bytes/s) of ``n_bytes`` in 64 MB pieces: into the page cache from as many
    threads as the store's writer uses (its ceiling), and from one thread with fsync (the
    sustained device speed)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from store.writer import IO_THREADS

    piece = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()

    def write(path: Path, size: int, sync: bool) -> int:
        with open(path, "wb") as fh:
            written = 0
            while written < size:
                fh.write(piece)
                written += len(piece)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        return written

    speeds = []
    for threads, sync in ((IO_THREADS, False), (1, True)):
        paths = [directory / f"raw{int(sync)}_{k}.bin" for k in range(threads)]
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(lambda p: write(p, n_bytes // threads, sync), paths))
        speeds.append(written / (time.perf_counter() - start))
        for path in paths:
            path.unlink()
    return speeds[0], speeds[1]


@contextlib.contextmanager
def _peak_memory(device: str) -> Iterator[list[int]]:
    """A list that holds, after the block, the peak bytes the CUDA allocator held in it (empty
    on the CPU)."""
    import torch

    peak: list[int] = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield peak
    if device == "cuda":
        torch.cuda.synchronize()
        peak.append(torch.cuda.max_memory_allocated())


MEMFS = Path("/dev/shm")


def _memfs_fits(n_bytes: int) -> bool:
    """Whether a RAM filesystem is there with ``n_bytes`` free."""
    import shutil

    try:
        return MEMFS.is_dir() and os.access(MEMFS, os.W_OK) and shutil.disk_usage(MEMFS).free >= n_bytes
    except OSError:
        return False


def measure(name: str, args: argparse.Namespace, device: str, workdir: Path) -> None:
    """Build one shape, time plain then capture, print its figures."""
    import shutil

    import torch

    layers = None
    while True:
        try:
            loaded = _build(name, args.smoke, device, layers)
            break
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            layers = (layers or 48) - 12
            if name == "llava" or layers < 12:
                raise
            print(f"# {name}: out of memory at full depth; rebuilding with {layers} layers")
    samples = _samples(args.samples, args.smoke, name)
    warm = samples[: args.batch_size]
    # All plain timings first: nnsight's wrapper patches the model's modules for good, so the
    # baseline must run before the first capture wraps it (GPU timings need no interleaving).
    time_plain(loaded, warm, args.batch_size)
    with _peak_memory(device) as plain_peak:
        plain, forward = zip(*[time_plain(loaded, samples, args.batch_size) for _ in range(args.repeats)])
    time_capture(loaded, warm, args.batch_size, workdir / f"{name}_warm")

    def captures(directory: Path, tag: str, repeats: int = args.repeats,
                 **kwargs: Any) -> list[tuple[float, int, int, float]]:
        out = []
        for rep in range(repeats):
            out.append(time_capture(loaded, samples, args.batch_size, directory / f"{name}_{tag}{rep}", **kwargs))
            shutil.rmtree(directory / f"{name}_{tag}{rep}")
        return out

    with _peak_memory(device) as capture_peak:
        disk_runs = captures(workdir, "disk")
    capture, wait = [r[0] for r in disk_runs], [r[3] for r in disk_runs]
    written, n_ok = disk_runs[-1][1], disk_runs[-1][2]
    memfs = memfs_thread_encode = None
    if _memfs_fits(3 * written):
        with tempfile.TemporaryDirectory(dir=MEMFS) as shm:
            memfs = statistics.median(r[0] for r in captures(Path(shm), "memfs"))
            memfs_thread_encode = statistics.median(
                r[0] for r in captures(Path(shm), "memfs_thread", encode_in_process=False))
    trace_only = statistics.median(
        time_capture(loaded, samples, args.batch_size, workdir / f"{name}_trace{rep}", activations=False)[0]
        for rep in range(args.repeats))
    cache_bw, sync_bw = _disk(workdir, written)
    p, c = statistics.median(plain), statistics.median(capture)
    limit = max(p, written / sync_bw)
    n = len(samples)
    print(f"# {name}: {loaded.n_layers} layers x hidden {loaded.hidden_size}, {n} samples, "
          f"batch {args.batch_size}, {n_ok} ok, {written / n / 1e6:.0f} MB per sample")
    print(f"gpu_capture_{name}_layers: {loaded.n_layers}")
    print(f"gpu_capture_{name}_forward_ms: {statistics.median(forward) / n * 1e3:.1f}")
    print(f"gpu_capture_{name}_plain_ms: {p / n * 1e3:.1f}")
    # plain encodes on the loop's thread; capture encodes ahead in its worker process
    print(f"gpu_capture_{name}_encode_collate_ms: {(p - statistics.median(forward)) / n * 1e3:.1f}")
    print(f"gpu_capture_{name}_capture_ms: {c / n * 1e3:.1f}")
    print(f"gpu_capture_{name}_trace_only_ms: {trace_only / n * 1e3:.1f}")
    print(f"gpu_capture_{name}_wait_for_store_ms: {statistics.median(wait) / n * 1e3:.1f}")
    if memfs is not None:
        print(f"gpu_capture_{name}_memfs_ms: {memfs / n * 1e3:.1f}")
        print(f"gpu_capture_{name}_memfs_thread_encode_ms: {memfs_thread_encode / n * 1e3:.1f}")
    if plain_peak:  # weights included: what a batch adds is the difference
        print(f"gpu_capture_{name}_peak_gib_plain: {plain_peak[0] / 2**30:.2f}")
        print(f"gpu_capture_{name}_peak_gib_capture: {capture_peak[0] / 2**30:.2f}")
    print(f"gpu_capture_{name}_store_gbps: {written / c / 1e9:.2f}")
    print(f"gpu_capture_{name}_disk_gbps: {cache_bw / 1e9:.2f}")
    print(f"gpu_capture_{name}_disk_fsync_gbps: {sync_bw / 1e9:.2f}")
    print(f"gpu_capture_vs_limit_{name}: {c / limit:.3f}")
    print(f"gpu_capture_overhead_{name}: {c / p:.3f}")
    # the strictest baseline: forwards of already encoded batches (no encoding, no collation)
    print(f"gpu_capture_overhead_{name}_vs_forward: {c / statistics.median(forward):.3f}")
    if memfs is not None:
        print(f"gpu_capture_overhead_{name}_memfs: {memfs / p:.3f}")
    else:
        print(f"# {name}: no room on {MEMFS} for the memfs figure")
    del loaded
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Run the GPU capture benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    parser.add_argument("--only", choices=("llava", "qwen3moe", "causal"),
                        help="one capture shape only, or only the causal sweep figure")
    parser.add_argument("--samples", type=int, default=None, help="samples per timing (default 48; smoke 4)")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per forward (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions of each timing (default 3; smoke 1)")
    parser.add_argument("--workdir", default=None, help="directory for the run stores (default: a temp dir)")
    parser.add_argument("--no-causal", action="store_true",
                        help="skip the causal sweep figure (bench.bench_causal.gpu_figures, Qwen3-VL-30B-A3B shape)")
    args = parser.parse_args(argv)
    import torch

    args.samples = args.samples or (4 if args.smoke else 48)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --smoke on a CPU machine")
    if device == "cuda":
        print(f"# device: {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in ("llava", "qwen3moe"):
            if args.only in (None, name):
                start = time.perf_counter()
                measure(name, args, device, Path(tmp))
                print(f"# {name}: {time.perf_counter() - start:.0f} s")
    if device == "cuda" and not args.no_causal and args.only in (None, "causal"):
        from bench.bench_causal import gpu_figures

        for key, value in gpu_figures().items():
            print(f"gpu_{key}: {value:.3f}" if isinstance(value, float) else f"# {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
