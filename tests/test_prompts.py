"""Prompts through the chat template, teacher-forced answers, masks, collation, length batching."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from capture.family import load_model
from capture.prompts import _align_expanded, collate, encode_sample, length_batches
from schemas.config import ModelConfig
from schemas.errors import GapError


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return load_model(ModelConfig(path=str(tiny_checkpoint("llava", n_layers=3)), dtype="float32"))


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return load_model(ModelConfig(path=str(tiny_checkpoint("qwen2_vl", n_layers=3)), dtype="float32"))


def _sample(question="what colour is it ?", answer="red", image=(56, 56), index=0):
    img = Image.new("RGB", image[::-1], "blue") if image else None
    return {"index": index, "sample_id": f"t/{index}", "image": img, "question": question, "answer": answer}


def _tokens(loaded, ids):
    return loaded.processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_llava_prompt_by_hand(llava):
    # tiny LLaVA template: "USER: <image>\n{question} ASSISTANT:", 16 visual tokens, answer appended
    s = encode_sample(llava.processor, llava.image_token_id, _sample())
    expect = (["USER", ":"] + ["<image>"] * 16 + ["what", "colour", "is", "it", "?", "ASSISTANT", ":", "red"])
    assert _tokens(llava, s.input_ids) == expect
    assert np.flatnonzero(s.is_visual).tolist() == list(range(2, 18))
    assert np.flatnonzero(s.is_text).tolist() == list(range(18, 23))
    assert np.flatnonzero(s.is_answer).tolist() == [25]
    assert s.answer_positions.tolist() == [25] and _tokens(llava, s.answer_ids) == ["red"]
    assert s.position.tolist() == list(range(26))
    # every per-token input got the answer too
    assert s.inputs["input_ids"][0].tolist() == s.input_ids.tolist()
    assert s.inputs["attention_mask"].tolist() == [[1] * 26]
    assert s.prompt_text == "USER: <image>\nwhat colour is it ? ASSISTANT:"


def test_question_is_found_in_the_user_turn(llava):
    # "USER" also starts the template; the question is the later occurrence
    s = encode_sample(llava.processor, llava.image_token_id, _sample(question="USER", image=None))
    assert _tokens(llava, s.input_ids) == ["USER", ":", "USER", "ASSISTANT", ":", "red"]
    assert np.flatnonzero(s.is_text).tolist() == [2]
    assert not s.is_visual.any()


@pytest.mark.parametrize("question", ["a", "assistant", "user"])
def test_question_that_the_template_also_writes_is_found_in_the_user_turn(qwen, question):
    # the question's text also stands in the template's own words after (or before) the user turn
    s = encode_sample(qwen.processor, qwen.image_token_id, _sample(question=question, image=None))
    tokens = _tokens(qwen, s.input_ids)
    user = tokens.index("user")
    assert np.flatnonzero(s.is_text).tolist() == [user + 1]
    assert tokens[user + 1:user + 3] == [question, "<|im_end|>"]


def test_qwen_prompt_by_hand(qwen):
    s = encode_sample(qwen.processor, qwen.image_token_id, _sample(answer="yes no", image=(56, 84)))
    # 56 x 84 px -> 4 x 6 patches of 14 -> 6 merged tokens (merge 2 x 2)
    expect = (["<|im_start|>", "user", "<|vision_start|>"] + ["<|image_pad|>"] * 6
              + ["<|vision_end|>", "what", "colour", "is", "it", "?", "<|im_end|>", "<|im_start|>",
                 "assistant", "yes", "no"])
    assert _tokens(qwen, s.input_ids) == expect
    assert s.is_visual.sum() == 6 and np.flatnonzero(s.is_text).tolist() == list(range(10, 15))
    assert np.flatnonzero(s.is_answer).tolist() == [18, 19]
    # mm_token_type_ids: 1 on image tokens, 0 elsewhere, including the appended answer
    assert s.inputs["mm_token_type_ids"][0].tolist() == s.is_visual.astype(int).tolist()
    assert s.inputs["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_answer_override_and_prompt_only(qwen):
    donor = encode_sample(qwen.processor, qwen.image_token_id, _sample(), answer="blue")
    assert _tokens(qwen, donor.answer_ids) == ["blue"] and donor.meta["answer"] == "blue"
    prompt = encode_sample(qwen.processor, qwen.image_token_id, _sample(), append_answer=False)
    assert not prompt.is_answer.any() and prompt.n_tokens == donor.n_tokens - 1
    assert _tokens(qwen, prompt.input_ids[-2:]) == ["<|im_start|>", "assistant"]


def test_collate_left_and_right(qwen):
    samples = [encode_sample(qwen.processor, qwen.image_token_id, _sample(image=size, index=i))
               for i, size in enumerate([(28, 28), (56, 112)])]
    n0, n1 = samples[0].n_tokens, samples[1].n_tokens
    assert n0 < n1
    pad = qwen.pad_token_id
    for side in ("right", "left"):
        b = collate(samples, pad, side)
        assert b.seq_len == n1 and b.lengths == [n0, n1]
        ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
        for i, s in enumerate(samples):
            sl = b.token_slice(i)
            assert ids[i, sl].tolist() == s.input_ids.tolist()
            assert mask[i].sum() == s.n_tokens and mask[i, sl].all()
            assert b.inputs["mm_token_type_ids"][i, sl].tolist() == s.is_visual.astype(int).tolist()
        short = ids[0, n0:] if side == "right" else ids[0, :n1 - n0]
        assert short.tolist() == [pad] * (n1 - n0)
        assert b.offsets == ([0, 0] if side == "right" else [n1 - n0, 0])
        # image tensors are concatenated in sample order
        assert b.inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 8]]
        assert b.inputs["pixel_values"].shape[0] == 4 + 32


def test_collate_mixes_samples_with_and_without_images(llava):
    samples = [encode_sample(llava.processor, llava.image_token_id, _sample(image=None)),
               encode_sample(llava.processor, llava.image_token_id, _sample(index=1))]
    b = collate(samples, llava.pad_token_id, "left")
    assert b.inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert b.inputs["input_ids"].shape == (2, samples[1].n_tokens)
    with pytest.raises(ValueError, match="padding_side"):
        collate(samples, 0, "middle")


def test_align_expanded():
    img = 7
    assert _align_expanded([1, img, 2], [1, img, img, img, 2], img, "s").tolist() == [0, 1, 1, 1, 2]
    assert _align_expanded([img, 3, img], [img, img, 3, img], img, "s").tolist() == [0, 0, 1, 2]
    with pytest.raises(GapError, match="sample s: the processor's tokens"):
        _align_expanded([1, img, 2], [1, img, 3], img, "s")


def test_length_batches():
    # sorted by length (5, 6, 7, 49, 50), then cut every batch_size items
    assert length_batches([5, 50, 6, 49, 7], batch_size=2) == [[0, 2], [3, 4], [1]]
    assert length_batches([5, 50, 6, 49, 7], batch_size=3) == [[0, 2, 4], [1, 3]]
    # padded tokens cap: 49 * 2 > 60 splits the long pair
    assert length_batches([5, 50, 6, 49], batch_size=4, max_tokens=60) == [[0, 2], [3], [1]]
    assert length_batches([], batch_size=2) == []


def test_missing_question_and_template_errors(llava):
    class NoTemplate:
        chat_template = None

    with pytest.raises(GapError, match="chat template"):
        encode_sample(NoTemplate(), 0, _sample())
    import copy

    mute = copy.deepcopy(llava.processor)
    mute.chat_template = "USER: hello ASSISTANT:"  # a template that drops the user's text
    with pytest.raises(GapError, match="sample t/0: the question text does not appear"):
        encode_sample(mute, llava.image_token_id, _sample(image=None))
    for question in ("   ", ""):  # blank or empty question: no text tokens, the sample still encodes
        s = encode_sample(llava.processor, llava.image_token_id, _sample(question=question))
        assert not s.is_text.any() and s.is_visual.sum() == 16 and s.is_answer.sum() == 1


# A reasoning checkpoint's template (Qwen3-VL-*-Thinking): the generation prompt opens a think
# block; the template's own rendering of an answer closes it first.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_reasoning_template_scores_the_answer_after_the_closed_think_block(tiny_checkpoint):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl", n_layers=3))
    proc.tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    proc.chat_template = THINKING_TEMPLATE
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    s = encode_sample(proc, image_id, _sample(question="what colour ?", image=None))
    assert s.prompt_text == ("<|im_start|>user\nwhat colour ?<|im_end|>\n"
                             "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = proc.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    assert tokens[-4:] == ["assistant", "<think>", "</think>", "red"]
    assert np.flatnonzero(s.is_answer).tolist() == [len(tokens) - 1]
    assert [tokens[i] for i in np.flatnonzero(s.is_text)] == ["what", "colour", "?"]
    # generation starts at the same place: it answers instead of reasoning
    prompt_only = encode_sample(proc, image_id, _sample(question="what colour ?", image=None),
                                append_answer=False)
    assert prompt_only.input_ids.tolist() == s.input_ids[:-1].tolist()


def test_template_without_an_assistant_turn_keeps_the_generation_prompt(tiny_checkpoint):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl", n_layers=3))
    proc.chat_template = THINKING_TEMPLATE.replace(
        "{% if message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}",
        "{% if message['role'] == 'assistant' %}{{ raise_exception('no assistant turns') }}{% endif %}")
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    s = encode_sample(proc, image_id, _sample(question="what colour ?", image=None))
    assert s.prompt_text.endswith("<|im_start|>assistant\n<think>\n")
