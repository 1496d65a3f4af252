"""LLaVA-NeXT (``llava-hf/llava-v1.6-*-hf``): LLaVA with any-resolution tiling.

The image processor picks the ``image_grid_pinpoints`` resolution that fits the image best,
cuts it into tower-sized tiles and adds one downscaled base tile. Each ``<image>`` expands to
the base tile's patches plus the unpadded tile grid with one ``image_newline`` per row, so
the visual token count depends on the image's size and aspect ratio.
"""

from __future__ import annotations

from capture.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: LLaVA-1.5's language model and token id, plus ``image_sizes`` in the forward."""

    family = "llava_next"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"

    def forward_keys(self) -> tuple[str, ...]:
        # The model recomputes each image's tile count and unpadding from image_sizes; without
        # it the forward fails. pixel_values is (images, tiles, 3, H, W), zero-padded on tiles.
        return ("input_ids", "attention_mask", "pixel_values", "image_sizes")


ADAPTER = LlavaNextAdapter()
