"""Qwen2.5-VL: Qwen2-VL inputs with a windowed-attention vision tower."""

from __future__ import annotations

from capture.qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same inputs and layer path as Qwen2-VL."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"


ADAPTER = Qwen2_5_VLAdapter()
