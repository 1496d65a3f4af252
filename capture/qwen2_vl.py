"""Qwen2-VL: dynamic resolution, a per-image run of ``<|image_pad|>``, multimodal RoPE."""

from __future__ import annotations

from capture.family import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: visual tokens per image = t*h*w / merge^2 from ``image_grid_thw``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"

    def forward_keys(self) -> tuple[str, ...]:
        # transformers 5 needs mm_token_type_ids (1 at image-pad positions) to place the 3-D
        # RoPE positions; the processor returns it.
        return ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


ADAPTER = Qwen2VLAdapter()
