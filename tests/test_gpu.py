"""The CUDA-only paths of capture, on a real GPU (``pytest -m gpu`` on the device machine).

On CUDA the runner copies the stored rows of each block's output to pinned host memory on a side
stream while the next batch runs (gathering scattered token subsets on the device first), and
recovers from real out-of-memory errors.
These tests run those paths for real and compare every stored state with an fp32 forward of
the same checkpoint on the CPU.  They are skipped where no GPU exists (CI runs ``-m 'not gpu'``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.family import load_model
from capture.runner import CaptureRunner, make_spec
from schemas.config import config_from_dict
from schemas.run import STATUS_NONFINITE, STATUS_OOM
from store.writer import RunWriter
from test_capture import FAMILIES, _capture, _reference, _samples

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 convolutions and matmuls (the vision towers) would differ from the CPU by ~1e-3.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _cfg(path, device_map: str, **capture):
    return config_from_dict({"model": {"path": str(path), "dtype": "float32", "device_map": device_map},
                             "data": {"name": "synthetic"}, "capture": capture})


def _capture_with_hook(path, layer: int, hook, batch_size: int, tmp_path):
    """Capture four samples on the GPU with ``hook`` on the MLP of decoder layer ``layer``."""
    loaded = load_model(_cfg(path, "auto").model)
    handle = loaded.layers()[layer].mlp.register_forward_hook(hook)
    try:
        return _capture(loaded, _cfg(path, "auto", batch_size=batch_size), _samples(4), tmp_path / "run")
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_capture_equals_the_cpu_forward(tiny_checkpoint, family, tmp_path):
    # Three batches of two: each batch's pinned copy overlaps the next batch's forward.
    path = tiny_checkpoint(family, n_layers=3)
    gpu = load_model(_cfg(path, "auto").model)
    cpu = load_model(_cfg(path, "cpu").model)
    assert gpu.input_device.type == "cuda"
    samples = _samples(6)
    stats, ds = _capture(gpu, _cfg(path, "auto", batch_size=2), samples, tmp_path / "run")
    assert (stats.n_ok, stats.n_failed) == (6, 0)
    hidden, token_sample = ds["hidden"].values, ds["token_sample"].values
    for sample in samples:
        row = int(np.flatnonzero(ds["sample_index"].values == sample["index"])[0])
        enc, ref, _ = _reference(cpu, sample)
        sel = token_sample == row
        np.testing.assert_array_equal(ds["input_ids"].values[sel], enc["input_ids"][0].numpy())
        for layer in range(cpu.n_layers - 1):
            np.testing.assert_allclose(hidden[layer][sel], ref[layer + 1][0].numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("max_runs", [8, 0])
def test_cuda_token_subsets_and_float16_equal_the_cpu_ones(tiny_checkpoint, max_runs, tmp_path, monkeypatch):
    # Stored rows copied run by run (8) or gathered on the device first (0), converted to float16
    # on the device, against the same capture on the CPU.
    from capture import runner

    monkeypatch.setattr(runner, "MAX_RUNS_PER_SAMPLE", max_runs)
    path = tiny_checkpoint("qwen2_vl", n_layers=3)
    runs = {}
    for device_map in ("auto", "cpu"):
        loaded = load_model(_cfg(path, device_map).model)
        cfg = _cfg(path, device_map, batch_size=3, tokens=["visual", "answer"], store_dtype="float16")
        _, runs[device_map] = _capture(loaded, cfg, _samples(5), tmp_path / device_map)
    gpu, cpu = runs["auto"], runs["cpu"]
    assert gpu.sizes["token"] == cpu.sizes["token"] > 0
    for name in ("input_ids", "position", "is_visual", "is_answer", "token_sample"):
        np.testing.assert_array_equal(gpu[name].values, cpu[name].values, err_msg=name)
    np.testing.assert_allclose(gpu["hidden"].values, cpu["hidden"].values, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(gpu["fp16_overflow"].values, cpu["fp16_overflow"].values)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl_moe"])
def test_cuda_interventions_equal_the_cpu_ones(tiny_checkpoint, family, tmp_path):
    # Batched patched variants resuming from the cached clean state (gaussian noise is drawn on
    # the CPU, so both see the same), and truncation with generation, on the GPU against the
    # same sweep on the CPU.
    path = tiny_checkpoint(family, n_layers=3)
    capture = {"batch_size": 2, "causal": {"methods": ["zero", "gaussian", "mean"], "batch_size": 4},
               "truncation": {"modes": ["knockout", "drop"], "score": ["logprob", "generate"],
                              "max_new_tokens": 3}}
    runs = {}
    for device_map in ("auto", "cpu"):
        loaded = load_model(_cfg(path, device_map).model)
        _, runs[device_map] = _capture(loaded, _cfg(path, device_map, **capture), _samples(4),
                                       tmp_path / device_map)
    gpu, cpu = runs["auto"], runs["cpu"]
    for name in ("logp_clean", "delta", "trunc_logp"):
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, atol=1e-4, rtol=1e-4, err_msg=name)
    np.testing.assert_array_equal(gpu["trunc_text"].values, cpu["trunc_text"].values)


def test_real_out_of_memory_halves_the_batch(tiny_checkpoint, tmp_path):
    # A genuine CUDA OOM from the allocator inside the traced forward (an impossible request
    # whenever more than one row runs), so recovery runs with the copy stream and cache as they are.
    sizes = []

    def greedy(module, args, output):
        sizes.append(output.shape[0])
        if output.shape[0] > 1:
            torch.empty(1 << 50, dtype=torch.uint8, device=output.device)
        return output

    stats, ds = _capture_with_hook(tiny_checkpoint("llava", n_layers=2), 0, greedy, 4, tmp_path)
    assert sizes[:3] == [4, 2, 1]
    assert (stats.n_ok, stats.n_failed) == (4, 0)
    assert set(ds["status"].values) == {"ok"} and STATUS_OOM not in set(ds["status"].values)
    assert torch.cuda.memory_allocated() < 1 << 30  # nothing of the failed attempts kept


def test_nonfinite_on_cuda_fails_only_that_sample(tiny_checkpoint, tmp_path):
    def poison(module, args, output):
        out = output.clone()
        out[0, 1] = float("inf")  # the first row of each batch, inside layer 1
        return out

    # llava: samples of one length, so no padding to poison
    stats, ds = _capture_with_hook(tiny_checkpoint("llava", n_layers=3), 1, poison, 2, tmp_path)
    status = ds["status"].values
    assert (status == STATUS_NONFINITE).sum() == 2 and (status == "ok").sum() == 2
    assert set(ds["nonfinite_layer"].values[status == STATUS_NONFINITE]) == {1}
    assert stats.n_bad == 2


def test_runner_uses_a_side_stream_on_cuda(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path, "auto").model)
    spec_cfg = _cfg(path, "auto")
    spec = make_spec(spec_cfg, loaded, n_total=1)
    with RunWriter(tmp_path / "run", spec) as writer:
        with CaptureRunner(loaded, spec_cfg, spec, writer) as runner:
            assert runner.cuda and runner.copy_stream is not None
            assert runner.copy_stream != torch.cuda.current_stream(runner.device)
            assert runner._encoder_process is not None  # the processor runs in a process of its own


def test_the_capture_loop_itself_never_waits_for_the_gpu(tiny_checkpoint, tmp_path):
    # A synchronising call in gap's own code (a copy from pageable memory, .item(), a nonzero)
    # between two forwards drains the GPU's queue and leaves it idle while the loop builds
    # records and sets up the next trace (capture.transfer).  The model's own (transformers,
    # e.g. LLaVA's image-token count check) are not ours to remove; PyTorch's sync debug mode
    # names every one, attributed to the Python line that made it.
    import warnings
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path, "auto").model)
    cfg = _cfg(path, "auto", batch_size=2, tokens=["visual", "answer"], store_dtype="float16")
    _capture(loaded, cfg, _samples(4), tmp_path / "warm")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats, _ = _capture(loaded, cfg, _samples(6), tmp_path / "run")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.n_ok == 6
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert syncs, "the sync debug mode reported nothing (the model's own checks synchronise)"
    ours = [f"{w.filename}:{w.lineno}" for w in syncs
            if Path(w.filename).resolve().parts[:len(repo.parts) + 1]
            in {repo.parts + (package,) for package in ("capture", "store", "schemas")}]
    assert ours == []
