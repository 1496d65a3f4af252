"""The GPU benchmark script runs end to end at tiny shapes on the CPU (device time is scarce)."""

import re

import pytest


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpu_capture_smoke_prints_consistent_figures(capsys):
    from bench import gpu_capture

    assert gpu_capture.main(["--smoke", "--only", "llava"]) == 0
    out = capsys.readouterr().out
    fig = {k: float(v) for k, v in re.findall(r"^(gpu_capture_[a-z0-9_]+): ([0-9.]+)$", out, re.M)}
    assert "# llava: 2 layers x hidden 64, 4 samples, batch 2, 4 ok" in out
    # the ratios are the printed per-sample times divided as documented (to rounding)
    assert fig["gpu_capture_overhead_llava"] == pytest.approx(
        fig["gpu_capture_llava_capture_ms"] / fig["gpu_capture_llava_plain_ms"], rel=0.02)
    assert fig["gpu_capture_overhead_llava_vs_forward"] == pytest.approx(
        fig["gpu_capture_llava_capture_ms"] / fig["gpu_capture_llava_forward_ms"], rel=0.05)
    # the forwards alone are part of the plain side, so the strict ratio is the larger one
    assert fig["gpu_capture_overhead_llava_vs_forward"] >= fig["gpu_capture_overhead_llava"] - 1e-3
    if "gpu_capture_llava_memfs_ms" in fig:
        assert fig["gpu_capture_overhead_llava_memfs"] == pytest.approx(
            fig["gpu_capture_llava_memfs_ms"] / fig["gpu_capture_llava_plain_ms"], rel=0.02)
    assert 0 <= fig["gpu_capture_llava_wait_for_store_ms"] <= fig["gpu_capture_llava_capture_ms"]
    assert fig["gpu_capture_vs_limit_llava"] <= fig["gpu_capture_overhead_llava"] + 1e-3
