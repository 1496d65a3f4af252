"""Capture overhead on this CPU: capturing every layer into a run store vs a plain forward.

Both sides process the same samples the same way (chat-template encoding, collation, batches of
similar length); the capture side also runs the nnsight trace, gathers every decoder block's
output, checks it for NaN/inf and hands the records to the store's background writer (closing
the writer, i.e. the last flush and commit, is inside the timing; creating the run, a one-time
cost per shard, is not). The model is a LLaVA built
from its config, large enough that the forward dominates. Repetitions alternate between the two
sides and the medians are compared, so load from other processes hits both alike.

Prints ``capture_overhead: X`` (goal <= 1.25), and ``capture_overhead_vs_forward``: the capture
against the plain side's forwards alone (already encoded batches, the strictest baseline).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

N_SAMPLES = 4
BATCH = 2
REPEATS = 5


def _setup(tmp: Path):
    import numpy as np
    from PIL import Image

    from capture.family import load_model
    from capture.tiny import build_tiny
    from schemas.config import config_from_dict

    # 8 layers x width 512 over 266 tokens (256 visual): ~0.2 s per sample forward on 2 idle cores.
    path = build_tiny("llava", tmp / "model", n_layers=8, hidden_size=512, image_size=224)
    cfg = config_from_dict({"model": {"path": str(path), "dtype": "float32"}})
    # Two instances of the same weights: nnsight's wrapper patches the modules it wraps for
    # good, so the plain side gets a model that was never wrapped.
    plain, loaded = load_model(cfg.model), load_model(cfg.model)
    rng = np.random.default_rng(0)
    samples = [{"index": i, "sample_id": f"bench/{i}", "question": "what colour is the square ?",
                "answer": "red", "image": Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))}
               for i in range(N_SAMPLES)]
    return plain, loaded, samples


def main() -> None:
    """Print ``capture_overhead`` (and the timings behind it)."""
    import torch

    torch.manual_seed(0)
    # One intra-op thread: on this shared 2-core machine, spinning thread pools make timings
    # swing by 2x; the writer thread still has the other core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> None:
    from bench.gpu_capture import time_capture, time_plain

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain_model, loaded, samples = _setup(tmp)
        time_plain(plain_model, samples[:BATCH], BATCH)  # warm-up (allocator, kernels)
        plain, forward, capture = [], [], []
        written = 0
        for rep in range(REPEATS):
            plain_seconds, forward_seconds = time_plain(plain_model, samples, BATCH)
            plain.append(plain_seconds)
            forward.append(forward_seconds)
            seconds, written, n_ok, _ = time_capture(loaded, samples, BATCH, tmp / f"run{rep}")
            if n_ok != len(samples):
                raise RuntimeError(f"capture stored {n_ok} of {len(samples)} samples")
            capture.append(seconds)
        print(f"capture_plain_seconds: {statistics.median(plain):.3f}")
        print(f"capture_forward_seconds: {statistics.median(forward):.3f}")
        print(f"capture_seconds: {statistics.median(capture):.3f}")
        print(f"capture_mb_written: {written / 1e6:.1f}")
        print(f"capture_overhead: {statistics.median(c / p for c, p in zip(capture, plain)):.3f}")
        print(f"capture_overhead_vs_forward: {statistics.median(c / f for c, f in zip(capture, forward)):.3f}")


if __name__ == "__main__":
    main()
