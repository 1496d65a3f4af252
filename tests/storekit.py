"""Synthetic records and a standalone writer process for the store tests (no model needed)."""

from __future__ import annotations

import sys
import time

import numpy as np

from schemas.config import config_from_dict
from schemas.run import SampleRecord, failed_record
from store.encoding import float32_to_bf16_bits
from store.writer import RunSpec

COORDS = {"layer": [0, 1, 2], "method": ["zero", "swap"], "channel": ["visual", "text"],
          "trunc_layer": [-1, 0, 2], "mode": ["knockout"]}


def make_spec(encoding: str = "bfloat16", layers=(0, 1, 2), hidden_size: int = 16, n_total: int = 12,
              block_tokens: int | None = 8, model_path: str = "/models/toy",
              score: tuple[str, ...] = ("logprob", "generate")) -> RunSpec:
    cfg = config_from_dict({"model": {"path": model_path},
                            "capture": {"causal": {"methods": ["zero", "swap"]},
                                        "truncation": {"modes": ["knockout"], "layers": [0, 2],
                                                       "score": list(score)}}})
    return RunSpec(config=cfg, model_info={"family": "toy", "n_layers": 3}, layers=list(layers),
                   hidden_size=hidden_size, hidden_encoding=encoding, coords=dict(COORDS),
                   n_total=n_total, block_tokens=block_tokens)


def make_record(index: int, spec: RunSpec, fail_every: int = 0) -> SampleRecord:
    """A deterministic record per index; every ``fail_every``-th sample is a failed one."""
    rng = np.random.default_rng(1000 + index)
    sid = f"toy/test/{index}"
    if fail_every and index % fail_every == fail_every - 1:
        return failed_record(index, sid, f"image of {sid} is corrupt", status="data_error",
                             question=f"q{index}?", answers=["x"])
    n = int(rng.integers(3, 20))
    n_vis = int(rng.integers(1, n))
    hidden = None
    if spec.layers:
        raw = rng.normal(size=(len(spec.layers), n, spec.hidden_size)).astype(np.float32) * 3
        hidden = {"bfloat16": float32_to_bf16_bits, "float32": lambda a: a,
                  "float16": lambda a: a.astype(np.float16)}[spec.hidden_encoding](raw)
    c = spec.coords
    shape = (len(c["layer"]), len(c["method"]), len(c["channel"]))
    return SampleRecord(
        index=index, sample_id=sid, question=f"what is {index}? ünïcode", answer=str(index),
        answers=[str(index), f"{index}.0"], subset="hard" if index % 2 else "easy",
        input_ids=rng.integers(0, 1000, n).astype(np.int32), position=np.arange(n, dtype=np.int32),
        is_visual=np.arange(n) < n_vis, is_text=np.arange(n) == n_vis, is_answer=np.arange(n) == n - 1,
        hidden=hidden,
        values={"logp_clean": float(rng.normal()), "delta": rng.normal(size=shape),
                "logp_patched": rng.normal(size=shape), "swap_donor": f"toy/test/{(index + 1) % 12}",
                "trunc_logp": rng.normal(size=(len(c["trunc_layer"]), len(c["mode"]))),
                "trunc_text": np.array([[f"t{index}{k}"] for k in range(len(c["trunc_layer"]))], dtype=object)})


def write_shard(run: str, shard: int, n_shards: int, n_total: int, resume: bool, sleep: float,
                segment_tokens: int = 10, fail_every: int = 0) -> None:
    from schemas.run import shard_indices
    from store.writer import RunWriter

    spec = make_spec(n_total=n_total)
    with RunWriter(run, spec, shard=(shard, n_shards), resume=resume, segment_tokens=segment_tokens,
                   commit_seconds=0.2) as writer:
        for index in shard_indices(n_total, shard, n_shards):
            if index in writer.committed:
                continue
            writer.put(make_record(index, spec, fail_every))
            if sleep:
                time.sleep(sleep)


if __name__ == "__main__":  # python storekit.py RUN SHARD N_SHARDS N_TOTAL RESUME SLEEP
    run, shard, n_shards, n_total, resume, sleep = sys.argv[1:7]
    write_shard(run, int(shard), int(n_shards), int(n_total), resume == "1", float(sleep))
