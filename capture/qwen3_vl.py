"""Qwen3-VL (dense): Qwen2-VL-style inputs plus DeepStack feature injection."""

from __future__ import annotations

from typing import Any

from capture.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: vision features from ``deepstack_visual_indexes`` are added to the visual
    positions after the first decoder layers.

    The text model adds DeepStack feature ``k`` to the hidden states *after* decoder layer
    ``k``'s output (``Qwen3VLTextModel._deepstack_process``), so those layers' captured block
    outputs (= ``hidden_states[k + 1]``) are the states before the injection, while causal
    patches and truncation act on the states after it, as the next layer reads them
    (:mod:`capture.causal`). The run records which layers these are.
    """

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"

    def deepstack_layers(self, config: Any) -> list[int]:
        return list(range(len(config.vision_config.deepstack_visual_indexes or [])))


ADAPTER = Qwen3VLAdapter()
