"""LLaVA-1.5 (``llava-hf/llava-1.5-*-hf``): CLIP tower + Llama; one ``<image>`` -> 576 tokens."""

from __future__ import annotations

from typing import Any

from capture.family import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5: fixed 336 px input, every image becomes the same run of ``<image>`` tokens."""

    family = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"

    def image_token_id(self, config: Any) -> int:
        # Older checkpoints name it image_token_index; transformers 5 aliases both.
        value = getattr(config, "image_token_id", None)
        return int(value if value is not None else config.image_token_index)

    def needs_position_ids(self) -> bool:
        # Llama derives positions from the cache, not the mask; under left padding the real
        # tokens would start at the pad count. Explicit positions keep padded == unpadded.
        return True


ADAPTER = LlavaAdapter()
