"""Truncation: knockout == drop on every layer (teacher forcing and cached greedy decoding), zero ==
an independent hook implementation, and the attention-mask rewrite checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.attention import block_keys, check_attention_implementation
from capture.truncation import MODES, run_truncation, trunc_layer_coords, truncation_sample
from schemas.errors import GapError

N_LAYERS = 4


@pytest.fixture(scope="module", params=[("llava", "eager"), ("llava", "sdpa"), ("qwen3_vl_moe", "eager"),
                                        ("qwen3_vl_moe", "sdpa")], ids=lambda p: "-".join(p))
def setup(request, tiny_checkpoint):
    from PIL import Image

    from capture.family import load_model
    from capture.prompts import encode_sample
    from schemas.config import ModelConfig

    family, attn = request.param
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(path=str(tiny_checkpoint(family, n_layers=N_LAYERS)), dtype="float32",
                                    attn_implementation=attn))
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 96, 3)) * 255).astype("uint8"))
    sample = encode_sample(loaded.processor, loaded.image_token_id,
                           {"index": 0, "sample_id": "t/0", "image": image,
                            "question": "what colour is the square ?", "answer": "red square"})
    return loaded, sample


def ref_score(loaded, sample, hooks=()):
    """Full forward with plain forward pre-hooks ``(layer, fn)`` (``fn(module, args)``, on the
    block's input); the answer scored from the logits."""
    handles = [loaded.layers()[k].register_forward_pre_hook(fn) for k, fn in hooks]
    try:
        with torch.no_grad():
            logits = loaded.model(**loaded.forward_inputs(sample.inputs)).logits[0]
    finally:
        for h in handles:
            h.remove()
    lp = torch.log_softmax(logits.double(), -1)
    return sum(lp[p - 1, int(sample.input_ids[p])].item() for p in np.flatnonzero(sample.is_answer))


def test_knockout_equals_drop_and_zero_equals_hooks(setup):
    loaded, sample = setup
    layers = list(range(N_LAYERS))
    res = truncation_sample(loaded, sample, modes=MODES, layers=layers, batch_size=3)
    assert res.error == ""
    lp = res.values["trunc_logp"]
    assert lp.shape == (1 + N_LAYERS, len(MODES))
    zero, knock, drop = (lp[:, MODES.index(m)] for m in ("zero", "knockout", "drop"))
    np.testing.assert_allclose(knock, drop, atol=1e-3, rtol=0)
    baseline = ref_score(loaded, sample)
    np.testing.assert_allclose(lp[0], baseline, atol=1e-4)
    # Truncating after the last block changes nothing.
    np.testing.assert_allclose(lp[-1], baseline, atol=1e-4)
    visual = torch.as_tensor(sample.is_visual)

    def zero_hook(module, args):
        # the state after the previous block as this block reads it (DeepStack's addition included)
        h = args[0].clone()
        h[0, visual] = 0
        return (h, *args[1:])

    for after in layers:
        ref = ref_score(loaded, sample, [(k, zero_hook) for k in range(after + 2, N_LAYERS)])
        assert zero[1 + after] == pytest.approx(ref, abs=1e-3), after
    # Not vacuous: taking the image away early moves the score.
    assert abs(knock[1] - baseline) > 1e-4 and abs(zero[1] - knock[1]) > 1e-5


def test_knockout_hooks_in_a_full_forward_equal_the_prefix_path(setup):
    """attention.knockout in the model's own forward (the generation path) vs run_suffix."""
    from capture.attention import knockout
    from capture.causal import Engine

    loaded, sample = setup
    res = truncation_sample(loaded, sample, modes=["knockout"], layers=[0, 2])
    visual = torch.as_tensor(sample.is_visual)[None]
    for row, after in ((1, 0), (2, 2)):
        with knockout(Engine(loaded).layers, after, visual):
            ref = ref_score(loaded, sample)
        assert res.values["trunc_logp"][row, 0] == pytest.approx(ref, abs=1e-4)


def test_zero_hooks_in_a_full_forward_equal_the_prefix_path(setup):
    """truncation.zero_visual in the model's own forward (the generation path) vs run_suffix."""
    from capture.truncation import zero_visual

    loaded, sample = setup
    res = truncation_sample(loaded, sample, modes=["zero"], layers=[0, 1])
    visual = torch.as_tensor(sample.is_visual)[None]
    for row, after in ((1, 0), (2, 1)):
        with zero_visual(loaded.layers(), after, visual):
            ref = ref_score(loaded, sample)
        assert res.values["trunc_logp"][row, 0] == pytest.approx(ref, abs=1e-4)


def _greedy_without_cache(loaded, prompt, after, n_new):
    """Independent greedy loop: the whole sequence re-run every step (no KV cache), knockout by hooks."""
    from capture.attention import knockout

    visual = torch.as_tensor(prompt.is_visual)[None]
    inputs = {k: v for k, v in prompt.inputs.items() if k in loaded.adapter.forward_keys()}
    new: list[int] = []
    for _ in range(n_new):
        step = dict(inputs)
        extra = torch.tensor([new], dtype=torch.long)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in inputs:
                tail = extra if key == "input_ids" else torch.full_like(extra, int(key == "attention_mask"))
                step[key] = torch.cat([inputs[key], tail.to(inputs[key].dtype)], 1)
        with torch.no_grad(), knockout(loaded.layers(), after, visual):
            logits = loaded.model(**step).logits
        new.append(int(logits[0, -1].argmax()))
    return loaded.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generation_knockout_persists_through_the_cache_and_equals_drop(setup):
    from capture.causal import with_answer

    loaded, sample = setup
    res = truncation_sample(loaded, sample, modes=["knockout", "drop", "zero"], layers=[0, 1],
                            score=["generate"], max_new_tokens=4)
    assert res.error == ""
    text = res.values["trunc_text"]
    assert text.shape == (3, 3) and "trunc_logp" in res.values
    assert list(text[1:, 0]) == list(text[1:, 1])            # knockout == drop
    assert len(set(text[0])) == 1 and text[0, 0]             # one baseline, not empty
    prompt = with_answer(sample, [])
    for row, after in ((1, 0), (2, 1)):
        assert text[row, 0] == _greedy_without_cache(loaded, prompt, after, 4)


def test_runner_hook_and_coords(setup):
    from capture.prompts import collate
    from schemas.config import TruncationConfig

    loaded, sample = setup
    cfg = TruncationConfig(modes=["drop", "knockout"], layers=[2, 0])
    coords = {"trunc_layer": trunc_layer_coords([0, 2]), "mode": ["drop", "knockout"]}
    out = run_truncation(loaded, collate([sample], loaded.pad_token_id), cfg, coords=coords)
    assert coords["trunc_layer"] == [-1, 0, 2]
    assert len(out) == 1 and out[0]["trunc_logp"].shape == (3, 2) and "trunc_text" not in out[0]
    np.testing.assert_allclose(out[0]["trunc_logp"][:, 0], out[0]["trunc_logp"][:, 1], atol=1e-3)


def test_block_keys_by_hand():
    blocked = torch.tensor([[False, True, True, False]])
    # None (sdpa causal): 4 queries over 4 keys; keys 1-2 hidden except from themselves.
    m = block_keys(None, blocked, q_len=4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    # Cached decoding, sdpa: one query, 6 keys (4 prompt + 2 generated), nothing else hidden.
    assert block_keys(None, blocked, q_len=1, n_keys=6)[0, 0].int().tolist() == [[1, 0, 0, 1, 1, 1]]
    # Eager float mask: padding (key 0 of row 1) stays hidden, the rest as above.
    minf = torch.finfo(torch.float32).min
    base = torch.zeros(2, 1, 1, 5)
    base[1, 0, 0, 0] = minf
    out = block_keys(base, torch.tensor([[False, True, True, False], [False, False, True, True]]), q_len=1)
    assert (out[:, 0, 0] == 0).int().tolist() == [[1, 0, 0, 1, 1], [0, 1, 0, 0, 1]]
    # Boolean mask input stays boolean.
    bool_mask = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    got = block_keys(bool_mask, blocked, q_len=2)
    assert got.dtype == torch.bool and got[0, 0].int().tolist() == [[1, 0, 1, 1], [1, 0, 0, 1]]


def test_flash_attention_is_refused():
    class Cfg:
        _attn_implementation = "flash_attention_2"

    class Model:
        config = Cfg()

    with pytest.raises(GapError, match="flash_attention_2"):
        check_attention_implementation(Model())
