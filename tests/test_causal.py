"""Causal tracing against an independent implementation: plain torch forward hooks, one variant
per full forward, its own patch values and its own scoring from the model's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capture.causal import (CHANNELS, METHODS, causal_sample, donor_rows, pick_donor, resample_tokens,
                            run_causal)

FAMILIES = ("llava", "llava_next", "qwen3_vl_moe")
N_LAYERS = 4


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tiny_checkpoint):
    from capture.family import load_model
    from capture.prompts import encode_sample
    from schemas.config import ModelConfig

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(path=str(tiny_checkpoint(request.param, n_layers=N_LAYERS)),
                                    dtype="float32", attn_implementation="eager"))

    def enc(index, image, question, answer):
        raw = {"index": index, "sample_id": f"t/{index}", "image": image, "question": question, "answer": answer}
        RAW[f"t/{index}"] = raw
        return encode_sample(loaded.processor, loaded.image_token_id, raw)

    # Different image sizes (Qwen: 4 vs 6 visual tokens) and question lengths: swap resamples.
    recipient = enc(3, _image(64, 64, 0), "what colour is the square ?", "red square")
    donor = enc(7, _image(96, 64, 1), "how many ?", "blue")
    return loaded, recipient, donor


RAW: dict[str, dict] = {}  # dataset items by sample id, to re-encode them in the reference


# -- the independent reference --------------------------------------------------------------------
def ref_inputs(loaded, sample):
    return {k: v for k, v in loaded.forward_inputs(sample.inputs).items()}


def readers(loaded):
    """``readers[l]`` reads the state after block ``l`` (DeepStack's addition included): the next
    block, or the final norm after the last one."""
    return [*loaded.layers()[1:], loaded.final_norm()]


def ref_score(loaded, sample, hook=None):
    """The answer's log-prob; ``hook = (l, fn)`` edits the state after block ``l`` (``fn(h) -> h``)."""
    def pre(module, args, kwargs):
        return (hook[1](args[0]), *args[1:]), kwargs

    handle = readers(loaded)[hook[0]].register_forward_pre_hook(pre, with_kwargs=True) if hook else None
    try:
        with torch.no_grad():
            logits = loaded.model(**ref_inputs(loaded, sample)).logits[0]
    finally:
        if handle:
            handle.remove()
    lp = torch.log_softmax(logits.double(), -1)
    ids = sample.input_ids
    return sum(lp[p - 1, int(ids[p])].item() for p in np.flatnonzero(sample.is_answer))


def ref_states(loaded, sample):
    """The states after every block, as the next module reads them."""
    states = []
    handles = [m.register_forward_pre_hook(lambda m, args: states.append(args[0][0].detach().clone()))
               for m in readers(loaded)]
    try:
        with torch.no_grad():
            loaded.model(**ref_inputs(loaded, sample))
    finally:
        for h in handles:
            h.remove()
    return states


def ref_interp(src: np.ndarray, n: int) -> np.ndarray:
    m = src.shape[0]
    if m == n:
        return src
    x = np.linspace(0, m - 1, n)
    return np.stack([np.interp(x, np.arange(m), src[:, d]) for d in range(src.shape[1])], axis=1)


def ref_value(method, states, idx, *, seed, index, layer, channel, donor_states=None, donor_idx=None):
    x = states[layer][idx]
    if method == "zero":
        return torch.zeros_like(x)
    if method == "mean":
        return x.mean(0, keepdim=True).expand_as(x)
    if method == "gaussian":
        ss = np.random.SeedSequence([seed, index, layer, CHANNELS.index(channel)])
        s = int(ss.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
        noise = torch.randn(tuple(x.shape), generator=torch.Generator().manual_seed(s))
        sigma = float(np.std(x.numpy().astype(np.float64)))
        return x + sigma * noise
    src = donor_states[layer][donor_idx].numpy().astype(np.float64)
    return torch.tensor(ref_interp(src, len(idx)), dtype=x.dtype)


def ref_patch_hook(idx, value):
    def patch(h):
        h = h.clone()
        h[0, idx] = value
        return h
    return patch


def ref_causal(loaded, sample, donor, *, seed=0):
    """delta, donor_logp_clean and donor_logp_patched the slow, obvious way."""
    from capture.prompts import encode_sample

    states, dstates = ref_states(loaded, sample), ref_states(loaded, donor)
    clean = ref_score(loaded, sample)
    # the recipient's prompt with the donor's answer, encoded by the prompt builder itself
    alt = encode_sample(loaded.processor, loaded.image_token_id, RAW[sample.meta["sample_id"]],
                        answer=donor.meta["answer"])
    alt_clean = ref_score(loaded, alt)
    delta = np.zeros((N_LAYERS, len(METHODS), len(CHANNELS)))
    donor_patched = np.zeros((N_LAYERS, len(CHANNELS)))
    index = sample.meta["index"]
    for li in range(N_LAYERS):
        for mi, method in enumerate(METHODS):
            for ci, channel in enumerate(CHANNELS):
                mask = sample.is_visual if channel == "visual" else sample.is_text
                idx = np.flatnonzero(mask)
                didx = np.flatnonzero(donor.is_visual if channel == "visual" else donor.is_text)
                value = ref_value(method, states, idx, seed=seed, index=index, layer=li, channel=channel,
                                  donor_states=dstates, donor_idx=didx)
                hook = (li, ref_patch_hook(torch.as_tensor(idx), value))
                delta[li, mi, ci] = clean - ref_score(loaded, sample, hook)
                if method == "swap":
                    donor_patched[li, ci] = ref_score(loaded, alt, hook)
    return clean, delta, alt_clean, donor_patched


_REFERENCE: dict[int, tuple] = {}


def _reference(setup):
    # computed once per family (the slow part), compared against both paths
    if id(setup[0]) not in _REFERENCE:
        _REFERENCE[id(setup[0])] = ref_causal(*setup)
    return _REFERENCE[id(setup[0])]


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [True, False])
def test_every_method_channel_layer_matches_hooks(setup, prefix):
    loaded, sample, donor = setup
    clean, delta, alt_clean, donor_patched = _reference(setup)
    res = causal_sample(loaded, sample, methods=METHODS, channels=CHANNELS, layers=list(range(N_LAYERS)),
                        donor=donor, prefix=prefix, batch_size=8)
    assert res.error == ""
    v = res.values
    assert v["logp_clean"] == pytest.approx(clean, abs=1e-4)
    assert v["delta"].shape == (N_LAYERS, len(METHODS), len(CHANNELS))
    np.testing.assert_allclose(v["delta"], delta, atol=1e-3, rtol=0)
    np.testing.assert_allclose(v["logp_patched"], clean - delta, atol=1e-3, rtol=0)
    assert v["swap_donor"] == "t/7"
    assert v["donor_logp_clean"] == pytest.approx(alt_clean, abs=1e-4)
    np.testing.assert_allclose(v["donor_logp_patched"], donor_patched, atol=1e-3, rtol=0)
    # The comparison is not vacuous: the patches move the score.
    assert np.abs(delta[0]).max() > 1e-3


def test_batched_equals_one_variant_per_forward(setup):
    loaded, sample, donor = setup
    kw = dict(methods=["zero", "gaussian"], channels=["visual", "text"], layers=list(range(N_LAYERS)), seed=5)
    batched = causal_sample(loaded, sample, batch_size=16, **kw).values["delta"]
    single = causal_sample(loaded, sample, batch_size=1, **kw).values["delta"]
    full = causal_sample(loaded, sample, batch_size=1, prefix=False, **kw).values["delta"]
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, full, atol=1e-5, rtol=0)
    assert np.isfinite(batched).all()


def test_gaussian_is_seeded(setup):
    loaded, sample, _ = setup
    kw = dict(methods=["gaussian"], channels=["visual"], layers=[0, 1])
    a = causal_sample(loaded, sample, seed=1, **kw).values["delta"]
    b = causal_sample(loaded, sample, seed=1, **kw).values["delta"]
    c = causal_sample(loaded, sample, seed=2, **kw).values["delta"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_failed_variants_mark_the_sample_not_the_run(setup):
    loaded, sample, _ = setup

    def boom(module, args, out):
        if out.shape[0] > 1:  # the clean pass (one row) goes through
            raise RuntimeError("injected failure")

    handle = loaded.layers()[2].register_forward_hook(boom)
    try:
        res = causal_sample(loaded, sample, methods=["zero"], channels=["visual"], layers=list(range(N_LAYERS)),
                            batch_size=2)
    finally:
        handle.remove()
    delta = res.values["delta"][:, 0, 0]
    assert "injected failure" in res.error and "t/3" in res.error and "\n" not in res.error
    # Variants at layers 0 and 1 run block 2 and fail; those at 2 and 3 start after it.
    assert np.isnan(delta[:2]).all() and np.isfinite(delta[2:]).all()


def test_sample_without_image_has_nan_visual_channel(setup):
    from capture.prompts import encode_sample

    loaded, _, _ = setup
    s = encode_sample(loaded.processor, loaded.image_token_id,
                      {"index": 0, "sample_id": "t/0", "image": None, "question": "what ?", "answer": "red"})
    res = causal_sample(loaded, s, methods=["zero", "mean"], channels=["visual", "text"], layers=[0, 3])
    assert res.error == ""
    assert np.isnan(res.values["delta"][..., 0]).all() and np.isfinite(res.values["delta"][..., 1]).all()


def test_runner_hook_returns_one_dict_per_sample(setup):
    from capture.prompts import collate
    from schemas.config import CausalConfig

    loaded, sample, donor = setup
    batch = collate([sample, donor], loaded.pad_token_id)
    coords = {"layer": [1, 3], "method": ["swap", "zero"], "channel": ["text"]}
    out = run_causal(loaded, batch, CausalConfig(methods=["swap", "zero"], channels=["text"], layers=[1, 3]),
                     coords=coords, donors=[donor, None])
    assert len(out) == 2
    assert out[0]["delta"].shape == (2, 2, 1) and out[0]["donor_logp_patched"].shape == (2, 1)
    assert "error" not in out[0] and np.isfinite(out[0]["delta"]).all()
    # no donor (a one-sample selection, unreadable donors) is no fault of the sample: swap NaN
    assert "error" not in out[1] and out[1]["swap_donor"] == ""
    assert np.isnan(out[1]["delta"][:, 0]).all() and np.isfinite(out[1]["delta"][:, 1]).all()


def test_donor_choice_and_resampling():
    picks = [pick_donor(i, 5, seed=3) for i in range(5)]
    assert all(p != i and 0 <= p < 5 for i, p in enumerate(picks))
    assert picks == [pick_donor(i, 5, seed=3) for i in range(5)]
    for i in range(5):  # the stand-ins: every other row, pick_donor's first, none twice
        rows = donor_rows(i, 5, seed=3, tries=10)
        assert rows[0] == picks[i] and sorted(rows) == [r for r in range(5) if r != i]
    assert donor_rows(0, 1) == [] and pick_donor(0, 1) is None
    src = torch.tensor([[0.0, 10.0], [3.0, 10.0], [9.0, 16.0]])
    np.testing.assert_allclose(resample_tokens(src, 5).numpy(), ref_interp(src.numpy().astype(float), 5), atol=1e-6)
    assert resample_tokens(src, 3) is src
    assert math.isclose(float(resample_tokens(src[:1], 4).sum()), 40.0)


def test_suffix_runs_respect_an_attention_that_takes_no_masks(setup, monkeypatch):
    # Flash attention reads no 4-D mask: knockout refuses it, and the clean-prefix shortcut (which
    # hands the blocks one) is not taken; the sweep gives the same numbers the long way.
    from capture import attention, causal
    from schemas.errors import GapError

    loaded, sample, _ = setup
    engine = causal.Engine(loaded)
    clean = engine.clean_pass(sample)
    first = int(np.flatnonzero(sample.is_text)[0])
    joins = [1, 2]
    made = []
    original = causal._CleanPrefixKV
    monkeypatch.setattr(causal, "_CleanPrefixKV", lambda *a: made.append(a) or original(*a))
    shortcut = engine.run_suffix(clean, joins, lambda r: clean.outputs[joins[r]], start=first)
    assert len(made) == 1  # eager: the shortcut is taken
    made.clear()
    monkeypatch.setattr(attention, "attention_implementation", lambda model: "flash_attention_2")
    with pytest.raises(GapError, match="attention knockout needs one of eager, sdpa"):
        engine.run_suffix(clean, joins, lambda r: clean.outputs[joins[r]], mode="knockout")
    full = engine.run_suffix(clean, joins, lambda r: clean.outputs[joins[r]], start=first)
    assert made == []
    np.testing.assert_allclose(full.numpy(), shortcut.numpy(), atol=1e-5)
    np.testing.assert_allclose(full.numpy(), clean.logp, atol=1e-4)


def test_a_sample_without_answer_tokens_is_an_error_not_a_score(setup):
    from capture.causal import with_answer
    from capture.truncation import truncation_sample

    loaded, sample, _ = setup
    bare = with_answer(sample, [])
    res = causal_sample(loaded, bare, methods=["zero"], channels=["visual"], layers=[0])
    assert "no answer tokens to score" in res.error and np.isnan(res.values["delta"]).all()
    res = truncation_sample(loaded, bare, modes=["zero"], layers=[0])
    assert "no answer tokens to score" in res.error and np.isnan(res.values["trunc_logp"]).all()


def test_a_donor_without_image_leaves_the_visual_swap_nan_without_error(setup):
    from capture.prompts import encode_sample

    loaded, sample, _ = setup
    donor = encode_sample(loaded.processor, loaded.image_token_id,
                          {"index": 9, "sample_id": "t/9", "image": None, "question": "how many ?", "answer": "blue"})
    res = causal_sample(loaded, sample, methods=["swap"], channels=list(CHANNELS), layers=[0, 1], donor=donor)
    assert res.error == ""
    delta = res.values["delta"][:, 0]
    visual, text = CHANNELS.index("visual"), CHANNELS.index("text")
    assert np.isnan(delta[:, visual]).all() and np.isfinite(delta[:, text]).all()
    assert np.isnan(res.values["donor_logp_patched"][:, visual]).all()

