"""Causal sweep speed: batched variants + clean-prefix reuse vs one variant per full forward.

Workload: one sample, an all-layer sweep of one method on one channel (``zero`` x ``visual``; the
text channel is reported too, where skipping the clean positions before the question helps), on
a tiny random LLaVA (16 blocks, width 128, 64 visual tokens) in float32 on the CPU. Ours:
:func:`capture.causal.causal_sample` with ``prefix=True`` (variants as batch rows sorted by layer,
each resuming from the cached clean block output). Reference: the same function with one variant
per full forward through nnsight (``prefix=False, batch_size=1``). Both include the clean pass,
and their deltas must agree (``causal_sweep_max_abs_diff``).

:func:`measure_sweep` is the reusable part: ``bench/gpu_capture.py`` calls it with its own model
(the Qwen3-VL-30B-A3B shape on an H100, :func:`qwen3_vl_30b_a3b_shape`) to report the same figure
on the GPU; :func:`gpu_figures` does both in one call.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np


def measure_sweep(loaded: Any, sample: Any, *, method: str = "zero", channel: str = "visual",
                  batch_size: int = 16, repeats: int = 2, warmup: bool = True) -> dict[str, float]:
    """Time an all-layer causal sweep of one sample: ours vs one variant per forward.

    Parameters
    ----------
    loaded
        :class:`capture.family.LoadedModel` (any device; the results are read back to the host,
        which synchronises).
    sample
        A :class:`capture.prompts.PromptSample` with its answer appended.
    method, channel
        The single method and channel swept over every layer.
    batch_size
        Variants per forward on our side.
    repeats
        Timed repetitions per side (the minimum is kept).
    warmup
        Run each side once untimed first (CUDA kernels, allocator, nnsight wrapper).

    Returns
    -------
    dict
        ``causal_sweep_speedup`` (reference time / ours), ``causal_sweep_ours_s``,
        ``causal_sweep_reference_s``, ``causal_sweep_max_abs_diff`` (deltas, ours vs reference)
        and ``causal_sweep_variants`` (= number of layers).

    Examples
    --------
    >>> import tempfile
    >>> from schemas.config import ModelConfig
    >>> from capture.tiny import build_tiny
    >>> from capture.family import load_model
    >>> from capture.prompts import encode_sample
    >>> loaded = load_model(ModelConfig(path=str(build_tiny("llava", tempfile.mkdtemp(), n_layers=2)),
    ...                                 dtype="float32"))
    >>> s = encode_sample(loaded.processor, loaded.image_token_id,
    ...                   {"index": 0, "sample_id": "x/0", "image": None, "question": "what ?", "answer": "red"})
    >>> sorted(measure_sweep(loaded, s, channel="text", repeats=1, warmup=False))[:2]
    ['causal_sweep_max_abs_diff', 'causal_sweep_ours_s']
    """
    from capture.causal import causal_sample

    layers = list(range(loaded.n_layers))
    kw = dict(methods=[method], channels=[channel], layers=layers)
    sides = {"ours": dict(prefix=True, batch_size=batch_size), "reference": dict(prefix=False, batch_size=1)}
    best = {name: float("inf") for name in sides}
    delta: dict[str, np.ndarray] = {}
    # Alternate the sides so that a busy machine slows both alike; keep each side's best time.
    for i in range(repeats + int(warmup)):
        for name, extra in sides.items():
            t0 = time.perf_counter()
            res = causal_sample(loaded, sample, **kw, **extra)
            elapsed = time.perf_counter() - t0
            if res.error:
                raise RuntimeError(res.error)
            delta[name] = res.values["delta"]
            if i >= int(warmup):
                best[name] = min(best[name], elapsed)
    return {"causal_sweep_speedup": best["reference"] / best["ours"], "causal_sweep_ours_s": best["ours"],
            "causal_sweep_reference_s": best["reference"],
            "causal_sweep_max_abs_diff": float(np.nanmax(np.abs(delta["ours"] - delta["reference"]))),
            "causal_sweep_variants": float(len(layers))}


# Qwen3-VL-30B-A3B's language model and vision tower (its config.json), for the GPU figure.
QWEN3_VL_30B_A3B_TEXT = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True})
QWEN3_VL_30B_A3B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                               out_hidden_size=2048, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])


def qwen3_vl_30b_a3b_shape(workdir: str, *, n_layers: int | None = None, device: str = "cuda",
                           dtype: str = "bfloat16", image_side: int = 800,
                           text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A random-weight model of the Qwen3-VL-30B-A3B shape and one sample (~625 visual tokens).

    The weights are random (the speed of a sweep does not depend on them); the processor and
    the word-level tokenizer come from a tiny checkpoint built in ``workdir``. ``text`` /
    ``vision`` override config entries (a smaller smoke-test shape on the CPU).

    Returns
    -------
    (LoadedModel, PromptSample)
    """
    import torch
    import transformers
    from PIL import Image

    from capture.family import LoadedModel, adapter_for
    from capture.prompts import encode_sample
    from capture.tiny import build_tiny

    tiny = build_tiny("qwen3_vl_moe", workdir, n_layers=1, image_size=image_side)
    processor = transformers.AutoProcessor.from_pretrained(tiny)
    tok = processor.tokenizer
    text_cfg = dict(QWEN3_VL_30B_A3B_TEXT, vocab_size=151936, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **(text or {}))
    if n_layers is not None:
        text_cfg["num_hidden_layers"] = n_layers
    ids = tok.convert_tokens_to_ids
    config = transformers.Qwen3VLMoeConfig(
        text_config=text_cfg, vision_config=dict(QWEN3_VL_30B_A3B_VISION, **(vision or {})),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    config.text_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    adapter = adapter_for("qwen3_vl_moe")
    info = {"family": "qwen3_vl_moe", "n_layers": config.text_config.num_hidden_layers,
            "hidden_size": config.text_config.hidden_size, "image_token_id": config.image_token_id,
            "deepstack_layers": adapter.deepstack_layers(config), "dtype": dtype}
    loaded = LoadedModel(model=model, processor=processor, adapter=adapter, info=info)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((image_side, image_side, 3)) * 255).astype("uint8"))
    sample = encode_sample(processor, loaded.image_token_id,
                           {"index": 0, "sample_id": "bench/0", "image": image,
                            "question": "what colour is the square in the top left of the image ?",
                            "answer": "red square"})
    return loaded, sample


def gpu_figures(batch_size: int = 16) -> dict[str, float]:
    """:func:`measure_sweep` on CUDA for the Qwen3-VL-30B-A3B shape (random bf16 weights, ~62 GB).

    For ``bench/gpu_capture.py``; the visual channel (the headline) and, as
    ``causal_sweep_speedup_text``, the text channel. Measured once on an H100: 8.4 (visual),
    5.8 (text, unwarmed).
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        loaded, sample = qwen3_vl_30b_a3b_shape(tmp)
        figures = measure_sweep(loaded, sample, batch_size=batch_size, repeats=1)
        text = measure_sweep(loaded, sample, channel="text", batch_size=batch_size, repeats=1)
        del loaded
        torch.cuda.empty_cache()
    figures["causal_sweep_speedup_text"] = text["causal_sweep_speedup"]
    return figures


def main() -> None:
    import torch
    from PIL import Image

    from capture.family import load_model
    from capture.prompts import encode_sample
    from capture.tiny import build_tiny
    from schemas.config import ModelConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny("llava", tmp, n_layers=16, hidden_size=128, image_size=112)
        loaded = load_model(ModelConfig(path=str(path), dtype="float32", attn_implementation="sdpa"))
        rng = np.random.default_rng(0)
        image = Image.fromarray((rng.random((112, 112, 3)) * 255).astype("uint8"))
        sample = encode_sample(loaded.processor, loaded.image_token_id,
                               {"index": 0, "sample_id": "bench/0", "image": image,
                                "question": "what colour is the square in the top left of the image ?",
                                "answer": "red square"})
        figures = measure_sweep(loaded, sample, channel="visual", repeats=1)
        text = measure_sweep(loaded, sample, channel="text", repeats=1)
    print(f"causal_sweep_variants: {int(figures['causal_sweep_variants'])}")
    print(f"causal_sweep_ours_s: {figures['causal_sweep_ours_s']:.3f}")
    print(f"causal_sweep_reference_s: {figures['causal_sweep_reference_s']:.3f}")
    worst = max(figures["causal_sweep_max_abs_diff"], text["causal_sweep_max_abs_diff"])
    print(f"causal_sweep_max_abs_diff: {worst:.2e}")
    print(f"causal_sweep_speedup_text: {text['causal_sweep_speedup']:.2f}")
    print(f"causal_sweep_speedup: {figures['causal_sweep_speedup']:.2f}")


if __name__ == "__main__":
    main()
