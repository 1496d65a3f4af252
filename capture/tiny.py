"""Tiny offline checkpoints of every supported family, built from their config classes.

Tests, benchmarks and the model organism need real checkpoints without the hub. A tiny
checkpoint is a model built from the family's transformers config class (random weights), a
word-level tokenizer built with the ``tokenizers`` library, the family's real image processor
(plus the video processor the Qwen processors require) and a chat template, all saved with
``save_pretrained`` so that the same local-path loading code users run
(``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained``) reads it.

The chat templates below belong to the tiny checkpoints only (a real checkpoint ships its own);
capture code never writes a template by hand, it always calls ``processor.apply_chat_template``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
LLAVA_PATCH = 14
# LLaVA-NeXT's grid pinpoints in tiles of the tower's side (the real checkpoints' default
# [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] for 336 px tiles).
LLAVA_NEXT_GRID = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

# Tokens every tiny tokenizer knows. The specials are what the processors and templates use.
SPECIAL_TOKENS = ["<pad>", "<unk>", "</s>", "<s>", "<image>", "<|vision_start|>", "<|image_pad|>",
                  "<|video_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
BASE_WORDS = ["USER", "ASSISTANT", "user", "assistant", "system", "You", "are", "a", "helpful",
              "what", "which", "is", "it", "the", "of", "in", "on", "a", "an", "colour", "color",
              "shape", "there", "how", "many", "yes", "no", "left", "right", "top", "bottom", "red",
              "green", "blue", "yellow", "square", "circle", "image", "picture", "chart", "value",
              "answer", "question", "and", "to"]
PUNCT = list(":?.,!'\"-()[]/")
ALNUM = list("abcdefghijklmnopqrstuvwxyz0123456789")

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as a template; also the
# LLaVA-NeXT Vicuna checkpoints' format.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The ChatML form the Qwen-VL checkpoints use (system turn omitted for brevity).
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vocabulary(vocab_words: list[str] | None) -> list[str]:
    words: list[str] = []
    for w in SPECIAL_TOKENS + BASE_WORDS + PUNCT + ALNUM + list(vocab_words or []):
        # The word-level pre-tokenizer splits on \w+ / punctuation runs; keep the vocabulary
        # consistent with it so a vocab word never becomes <unk>.
        if w not in words:
            words.append(w)
    return words


def build_tokenizer(vocab_words: list[str] | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` with the specials every family needs.

    Examples
    --------
    >>> tok = build_tokenizer(["zebra"])
    >>> tok.convert_ids_to_tokens(tok("what zebra ?")["input_ids"])
    ['what', 'zebra', '?']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary(vocab_words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="</s>", bos_token="<s>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS
                                                          if t not in ("<pad>", "<unk>", "</s>", "<s>")]})
    return tok


def _text_kwargs(n_layers: int, hidden_size: int, vocab_size: int, tok: Any) -> dict[str, Any]:
    heads = 4
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _mrope(head_dim: int, interleaved: bool = False) -> dict[str, Any]:
    # mrope_section splits head_dim / 2 rotary frequencies over (t, h, w).
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    if interleaved:
        out["mrope_interleaved"] = True
    return out


def qwen_token_ids(tok: Any) -> dict[str, int]:
    """The Qwen-VL config's special token ids, from a tokenizer of :func:`build_tokenizer`."""
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _llava_next_pinpoints(side: int) -> list[list[int]]:
    return [[h * side, w * side] for h, w in LLAVA_NEXT_GRID]


def _llava_config(family: str, tok: Any, n_layers: int, hidden_size: int, image_size: int) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=LLAVA_PATCH,
                              projection_dim=32)
    text = LlamaConfig(**_text_kwargs(n_layers, hidden_size, len(tok), tok))
    common = dict(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                  image_seq_length=(image_size // LLAVA_PATCH) ** 2, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    if family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=_llava_next_pinpoints(image_size))
    return LlavaConfig(**common)


def build_processor(family: str, vocab_words: list[str] | None = None, image_size: int | None = None) -> Any:
    """The family's processor around a tiny word-level tokenizer (see :func:`build_tiny`).

    Also used with real image sizes by ``bench/gpu_capture.py`` (random-weight models of the
    real shapes need real visual token counts, not a real vocabulary).

    Examples
    --------
    >>> p = build_processor("llava", image_size=336)
    >>> p.image_processor.crop_size["height"], p.tokenizer.convert_tokens_to_ids("<image>")
    (336, 4)
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    tok = build_tokenizer(vocab_words)
    if family == "llava":
        side = image_size or 56
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": side},
                                                          crop_size={"height": side, "width": side})
        return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                                           patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                                           chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    if family == "llava_next":
        side = image_size or 28
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side},
            image_grid_pinpoints=_llava_next_pinpoints(side))
        return transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok,
                                               patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                                               chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    patch = 16 if family.startswith("qwen3") else 14
    side = image_size or 112
    unit = patch * 2  # one merged visual token covers (patch * merge)^2 pixels
    size = {"shortest_edge": unit * unit, "longest_edge": side * side}
    image_processor = transformers.Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2,
                                                         temporal_patch_size=2)
    video_cls, proc_cls = {
        "qwen2_vl": ("Qwen2VLVideoProcessor", "Qwen2VLProcessor"),
        "qwen2_5_vl": ("Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor"),
    }.get(family, ("Qwen3VLVideoProcessor", "Qwen3VLProcessor"))
    video = getattr(transformers, video_cls)(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    return getattr(transformers, proc_cls)(image_processor=image_processor, tokenizer=tok,
                                           video_processor=video, chat_template=QWEN_TEMPLATE)


def _qwen_config(family: str, tok: Any, n_layers: int, hidden_size: int) -> Any:
    import transformers

    text = _text_kwargs(n_layers, hidden_size, len(tok), tok)
    head_dim = hidden_size // text["num_attention_heads"]
    ids = qwen_token_ids(tok)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config={**text, "rope_parameters": _mrope(head_dim)},
                                          vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return transformers.Qwen2_5_VLConfig(text_config={**text, "rope_parameters": _mrope(head_dim)},
                                             vision_config=vision, **ids)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    text.update(head_dim=head_dim, rope_parameters=_mrope(head_dim, interleaved=True))
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1)
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)


def build_tiny(family: str, out_dir: str | Path, *, n_layers: int = 4, hidden_size: int = 64,
               vocab_words: list[str] | None = None, image_size: int | None = None, seed: int = 0,
               dtype: str = "float32") -> Path:
    """Build and save a tiny random-weight checkpoint of ``family`` into ``out_dir``.

    Parameters
    ----------
    family
        One of ``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``.
    out_dir
        Directory to write (created); afterwards it loads like any local checkpoint.
    n_layers, hidden_size
        Decoder depth and width of the language model (4 heads, 2 key/value heads).
    vocab_words
        Extra words for the word-level tokenizer (e.g. a synthetic dataset's words).
    image_size
        LLaVA: the square input side (56 -> 16 visual tokens with 14 px patches). LLaVA-NeXT:
        the tile side (default 28: 4 patches a tile); the grid pinpoints are the real
        checkpoints' 1x2, 2x1, 2x2, 3x1 and 1x3 tiles, so an image gets 3 to 5 tiles with
        the base one. Qwen: the side of the largest square the image processor keeps (max
        pixels = side^2); defaults to 112 (Qwen2/2.5: up to 16 visual tokens, Qwen3: up to 9).
    seed
        Seed of the random weights (same seed, same checkpoint).
    dtype
        Weight dtype to save (``float32``, ``bfloat16``, ``float16``).

    Returns
    -------
    Path
        ``out_dir``.

    Examples
    --------
    >>> import tempfile
    >>> from transformers import AutoProcessor
    >>> path = build_tiny("llava", tempfile.mkdtemp(), n_layers=2)
    >>> AutoProcessor.from_pretrained(path).tokenizer.convert_tokens_to_ids("<image>")
    4
    """
    import torch
    from transformers import AutoModelForImageTextToText

    processor = build_processor(family, vocab_words, image_size)
    tok = processor.tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family.startswith("llava"):
        config = _llava_config(family, tok, n_layers, hidden_size, image_size or (56 if family == "llava" else 28))
    else:
        config = _qwen_config(family, tok, n_layers, hidden_size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Record how it was built, so a reader of the directory knows it is synthetic.
    (out / "tiny.json").write_text(json.dumps({"family": family, "n_layers": n_layers,
                                               "hidden_size": hidden_size, "seed": seed, "dtype": dtype}))
    return out
