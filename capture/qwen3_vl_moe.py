"""Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B): Qwen3-VL with sparse-expert MLPs."""

from __future__ import annotations

from capture.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: same inputs, DeepStack and layer path as the dense model."""

    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = "Qwen3VLMoeForConditionalGeneration"


ADAPTER = Qwen3VLMoeAdapter()
