"""The capture loop against plain transformers forwards, for every family (tiny fp32 checkpoints).

The reference states come from the processor's own ``apply_chat_template(tokenize=True)`` path
and one unbatched ``model(..., output_hidden_states=True)`` per sample, independent of
``capture.prompts`` and of nnsight.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capture.family import load_model
from capture.runner import CaptureRunner, make_spec
from schemas.config import config_from_dict
from schemas.errors import GapError
from schemas.run import STATUS_DATA, STATUS_ERROR, STATUS_NONFINITE, STATUS_OOM
from store import open_run
from store.writer import RunWriter

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
# Different shapes give the Qwen families different visual token counts within one batch.
SIZES = [(56, 56), (112, 84), (28, 112), (84, 84)]
QUESTIONS = ["what colour is the square ?", "how many circle ?", "is there a red square ?",
             "which is the value ?"]
ANSWERS = ["red", "2", "yes no", "blue"]
# LLaVA-NeXT visual tokens of the SIZES images (28 px tiles of 2x2 patches, pinpoints 1x2, 2x1,
# 2x2, 3x1, 1x3 tiles as (h, w)). 56x56, 112x84, 84x84 fit 2x2 tiles best (4x4 patches; the
# aspect unpadding removes no whole patch row): 16 + 4 row newlines + 4 base-tile patches = 24.
# 28x112 fits 1x3 (scale 0.75 keeps 21x84 px): 2x6 patches, unpadding would keep
# int(28 * 6 / 112) = 1 row, (2 - 1) // 2 = 0 rows removed: 12 + 2 newlines + 4 = 18.
LLAVA_NEXT_TOKENS = [24, 24, 18, 24]


def _samples(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append({"index": i, "sample_id": f"t/{i}", "image": img, "question": QUESTIONS[i % 4],
                    "answer": ANSWERS[i % 4], "answers": [ANSWERS[i % 4]], "subset": "easy"})
    return out


def _truncated_image() -> Image.Image:
    """An image whose file is cut short: it opens, and fails when its pixels are read."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    return Image.open(io.BytesIO(png.getvalue()[:60]))


def _capture(loaded, cfg, samples, run, **runner_kwargs):
    spec = make_spec(cfg, loaded, n_total=len(samples))
    with RunWriter(run, spec) as writer, CaptureRunner(loaded, cfg, spec, writer, **runner_kwargs) as runner:
        stats = runner.run(samples)
    return stats, open_run(run)


def _cfg(path, **capture):
    return config_from_dict({"model": {"path": str(path), "dtype": "float32"},
                             "data": {"name": "synthetic"}, "capture": capture})


def _reference(loaded, sample):
    """Unbatched forward through the processor's own chat-template path, answer appended."""
    proc = loaded.processor
    msgs = [{"role": "user", "content": [{"type": "image", "image": sample["image"]},
                                         {"type": "text", "text": sample["question"]}]}]
    enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    answer = torch.tensor([proc.tokenizer(sample["answer"], add_special_tokens=False)["input_ids"]])
    n = answer.shape[1]
    enc["input_ids"] = torch.cat([enc["input_ids"], answer], 1)
    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones(1, n, dtype=torch.long)], 1)
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], 1)
    with torch.no_grad():
        out = loaded.model(**enc, output_hidden_states=True)
    return enc, out.hidden_states, n


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param, n_layers=3)
    return request.param, path, load_model(_cfg(path).model)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stored_states_equal_plain_forward(family_model, padding_side, tmp_path):
    family, path, loaded = family_model
    samples = _samples()
    cfg = _cfg(path, batch_size=4)
    stats, ds = _capture(loaded, cfg, samples, tmp_path / "run", padding_side=padding_side)
    assert (stats.n_ok, stats.n_failed) == (4, 0)
    hidden = ds["hidden"].values  # (layer, token, hidden)
    token_sample = ds["token_sample"].values
    n_visual = []
    for k, sample in enumerate(samples):
        row = int(np.flatnonzero(ds["sample_index"].values == sample["index"])[0])
        sel = token_sample == row
        enc, ref, n_answer = _reference(loaded, sample)
        ids = enc["input_ids"][0].numpy()
        np.testing.assert_array_equal(ds["input_ids"].values[sel], ids)
        np.testing.assert_array_equal(ds["position"].values[sel], np.arange(len(ids)))
        # masks: the image-token positions, the appended answer
        np.testing.assert_array_equal(ds["is_visual"].values[sel], ids == loaded.image_token_id)
        is_answer = np.zeros(len(ids), bool)
        is_answer[len(ids) - n_answer:] = True
        np.testing.assert_array_equal(ds["is_answer"].values[sel], is_answer)
        n_visual.append(int(ds["is_visual"].values[sel].sum()))
        states = hidden[:, sel]
        for layer in range(loaded.n_layers - 1):
            np.testing.assert_allclose(states[layer], ref[layer + 1][0].numpy(), atol=2e-5, rtol=1e-4)
        # transformers' last hidden state is after the final norm; we store the block output
        last = loaded.final_norm()(torch.from_numpy(states[-1]))
        np.testing.assert_allclose(last.detach().numpy(), ref[-1][0].numpy(), atol=2e-5, rtol=1e-4)
    if family == "llava":
        assert n_visual == [16] * 4  # (56 / 14)^2 patches, CLS dropped
    elif family == "llava_next":
        assert n_visual == LLAVA_NEXT_TOKENS  # tilings worked out at LLAVA_NEXT_TOKENS
    else:
        grid = [int(loaded.processor(text=["<|image_pad|>"], images=[s["image"]])["image_grid_thw"][0].prod())
                for s in samples]
        assert n_visual == [g // 4 for g in grid]  # t*h*w / merge^2
        assert len(set(n_visual)) > 1  # different image sizes in one batch


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llava_next_masks_follow_each_images_tiling(tiny_checkpoint, padding_side, tmp_path):
    # 28x112 (3 tiles + base) and 56x56 (4 tiles + base) in one batch: different tile counts
    # (pixel_values zero-padded on tiles) and different visual token counts.
    path = tiny_checkpoint("llava_next", n_layers=3)
    loaded = load_model(_cfg(path).model)
    samples = [_samples(3)[2], _samples(1)[0]]
    stats, ds = _capture(loaded, _cfg(path, batch_size=2), samples, tmp_path / "run", padding_side=padding_side)
    assert (stats.n_ok, stats.n_failed) == (2, 0)
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<image>")
    for sample, n_visual in zip(samples, [18, 24]):
        row = int(np.flatnonzero(ds["sample_index"].values == sample["index"])[0])
        sel = ds["token_sample"].values == row
        # "USER" ":" then the image run, then "\n" is whitespace to the word-level tokenizer
        expected = np.zeros(int(sel.sum()), bool)
        expected[2:2 + n_visual] = True
        np.testing.assert_array_equal(ds["is_visual"].values[sel], expected)
        np.testing.assert_array_equal(ds["input_ids"].values[sel] == image_id, expected)
        _, ref, _ = _reference(loaded, sample)
        np.testing.assert_allclose(ds["hidden"].values[0, sel], ref[1][0].numpy(), atol=2e-5, rtol=1e-4)


def test_text_mask_is_the_question(family_model, tmp_path):
    _, path, loaded = family_model
    samples = _samples(2)
    _, ds = _capture(loaded, _cfg(path, batch_size=2, layers=[0]), samples, tmp_path / "run")
    tok = loaded.processor.tokenizer
    for row, sample in enumerate(samples):
        sel = ds["token_sample"].values == row
        ids = ds["input_ids"].values[sel]
        # the tiny tokenizers are word-level: one token per whitespace-separated word
        assert tok.convert_ids_to_tokens(ids[ds["is_text"].values[sel]].tolist()) == sample["question"].split()
        assert tok.convert_ids_to_tokens(ids[ds["is_answer"].values[sel]].tolist()) == sample["answer"].split()


def test_alone_equals_batched(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_vl", n_layers=3)
    loaded = load_model(_cfg(path).model)
    samples = _samples()
    _, alone = _capture(loaded, _cfg(path, batch_size=1), samples, tmp_path / "a")
    for side in ("left", "right"):
        _, batched = _capture(loaded, _cfg(path, batch_size=4), samples, tmp_path / side, padding_side=side)
        np.testing.assert_array_equal(alone["input_ids"].values, batched["input_ids"].values)
        np.testing.assert_allclose(alone["hidden"].values, batched["hidden"].values, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(alone["logp_clean"].values, batched["logp_clean"].values, rtol=1e-5)


def test_logp_clean_is_the_answer_logprob(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llava", n_layers=3)
    loaded = load_model(_cfg(path).model)
    samples = _samples(2)
    projected = []
    hook = loaded.model.lm_head.register_forward_hook(lambda m, args, out: projected.append(tuple(args[0].shape[:2])))
    try:
        _, ds = _capture(loaded, _cfg(path, batch_size=2), samples, tmp_path / "run")
    finally:
        hook.remove()
    # one batch of both (right padded): the LM head saw only the positions predicting an answer
    predicting = set()
    for sample in samples:
        enc, _, n = _reference(loaded, sample)
        length = enc["input_ids"].shape[1]
        predicting |= set(range(length - n - 1, length - 1))
    assert projected == [(2, len(predicting))]
    for row, sample in enumerate(samples):
        enc, _, n = _reference(loaded, sample)
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(**enc).logits[0].double(), -1)
        ids = enc["input_ids"][0]
        expect = sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - n, len(ids)))
        assert ds["logp_clean"].values[row] == pytest.approx(expect, rel=1e-6)


def test_bfloat16_run_stores_bit_patterns(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llava", n_layers=2)
    cfg = config_from_dict({"model": {"path": str(path), "dtype": "bfloat16"}, "capture": {"batch_size": 2}})
    loaded = load_model(cfg.model)
    sample = _samples(1)[0]
    _, ds = _capture(loaded, cfg, [sample], tmp_path / "run")
    _, ref, _ = _reference(loaded, sample)
    # bf16 -> float32 decoding is exact: the stored values are the model's bf16 values
    np.testing.assert_array_equal(ds["hidden"].values[0], ref[1][0].float().numpy())


def test_nonfinite_sample_fails_naming_the_layer(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llava", n_layers=3)
    loaded = load_model(_cfg(path).model)
    samples = _samples(3)
    poison_row = {}

    def hook(module, args, output):
        out = output.clone()
        out[poison_row["row"], 2] = float("nan")  # one token of one row, inside layer 1
        return out

    # the batch is sorted by length then index; all llava samples have the same length
    poison_row["row"] = 1
    # on a submodule: nnsight reads the block's output through its own hook on the block
    handle = loaded.layers()[1].mlp.register_forward_hook(hook)
    try:
        stats, ds = _capture(loaded, _cfg(path, batch_size=3), samples, tmp_path / "run")
    finally:
        handle.remove()
    status = dict(zip(ds["sample_id"].values, ds["status"].values))
    assert status == {"t/0": "ok", "t/1": STATUS_NONFINITE, "t/2": "ok"}
    bad = int(np.flatnonzero(ds["sample_id"].values == "t/1")[0])
    assert ds["nonfinite_layer"].values[bad] == 1
    assert "layer 1" in ds["error"].values[bad]
    assert stats.n_bad == 1


def test_large_finite_float16_states_are_not_called_nonfinite(tiny_checkpoint, tmp_path):
    # A float16 row whose values are finite may sum past float16's 65504 (massive activations):
    # only a real NaN/inf fails a sample.
    path = tiny_checkpoint("llava", n_layers=2)
    cfg = config_from_dict({"model": {"path": str(path), "dtype": "float16"}, "capture": {"batch_size": 2}})
    loaded = load_model(cfg.model)
    shift = 70000.0 / loaded.hidden_size  # each value small, each row's sum beyond 65504
    handle = loaded.layers()[0].mlp.register_forward_hook(lambda m, args, out: out + shift)
    try:
        stats, ds = _capture(loaded, cfg, _samples(2), tmp_path / "run")
    finally:
        handle.remove()
    assert (stats.n_ok, stats.n_failed) == (2, 0)
    first = ds["hidden"].values[0]
    assert np.isfinite(first).all() and (first.astype(np.float32).sum(-1) > 65504).all()


def test_data_errors_are_recorded_and_the_shard_goes_on(tiny_checkpoint, tmp_path):
    from capture.datasets import DataError

    path = tiny_checkpoint("qwen2_vl", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(3)
    samples[1]["image"] = _truncated_image()
    bad = DataError("t/9", "image file is truncated", index=3)
    stats, ds = _capture(loaded, _cfg(path, batch_size=2), samples + [bad], tmp_path / "run")
    status = dict(zip(ds["sample_id"].values, ds["status"].values))
    assert status == {"t/0": "ok", "t/1": STATUS_DATA, "t/2": "ok", "t/9": STATUS_DATA}
    assert stats.n_bad == 0 and stats.n_failed == 2
    errors = dict(zip(ds["sample_id"].values, ds["error"].values))
    assert errors["t/9"] == "image file is truncated" and "\n" not in errors["t/1"]


@pytest.mark.parametrize("error,status,reason", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), STATUS_OOM,
     "CUDA out of memory with {n} tokens alone"),
    (RuntimeError("Image features and image tokens do not match\nmore detail"), STATUS_ERROR,
     "RuntimeError: Image features and image tokens do not match"),
], ids=["oom", "model_error"])
def test_a_failing_batch_is_halved_down_to_the_sample_at_fault(tiny_checkpoint, tmp_path, monkeypatch, error,
                                                               status, reason):
    # CUDA OOM or an error of the model on one sample: its batch is halved down to that sample,
    # which is recorded failed (retryable); the samples around it are captured.
    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(6)
    sizes, at_fault = [], []
    original = CaptureRunner._forward

    def flaky(self, batch_samples):
        sizes.append(len(batch_samples))
        if "t/3" in [s.meta["sample_id"] for s in batch_samples]:
            at_fault[:] = [s.n_tokens for s in batch_samples]
            raise error
        return original(self, batch_samples)

    monkeypatch.setattr(CaptureRunner, "_forward", flaky)
    stats, ds = _capture(loaded, _cfg(path, batch_size=4), samples, tmp_path / "run")
    assert sizes == [4, 2, 2, 1, 1, 2]  # t/3 is in the first batch, in its second half
    got = dict(zip(ds["sample_id"].values, ds["status"].values))
    assert got == {f"t/{i}": status if i == 3 else "ok" for i in range(6)}
    row = list(ds["sample_id"].values).index("t/3")
    assert ds["error"].values[row] == reason.format(n=at_fault[0])
    assert (stats.n_ok, stats.n_bad) == (5, 1)


def test_a_model_failing_on_every_sample_stops_the_shard_keeping_what_was_captured(tiny_checkpoint, tmp_path,
                                                                                   monkeypatch):
    from capture import runner

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(8)
    original = CaptureRunner._forward
    calls = []

    def broken_after_two(self, batch_samples):
        calls.append(batch_samples[0].meta["sample_id"])
        if len(calls) > 2:
            raise ValueError("shapes do not match")
        return original(self, batch_samples)

    monkeypatch.setattr(CaptureRunner, "_forward", broken_after_two)
    monkeypatch.setattr(runner, "MAX_ERRORS_IN_A_ROW", 3)
    cfg = _cfg(path, batch_size=1)
    spec = make_spec(cfg, loaded, n_total=len(samples))
    with pytest.raises(GapError, match=r"failed on 3 samples in a row \(last, t/\d: ValueError: shapes do not match\)"):
        with RunWriter(tmp_path / "run", spec) as writer:
            CaptureRunner(loaded, cfg, spec, writer).run(samples)
    ds = open_run(tmp_path / "run")
    status = dict(zip(ds["sample_id"].values, ds["status"].values))
    # the second batch was still in flight when the third failed: it is stored too
    assert status == {**{sid: "ok" for sid in calls[:2]}, **{sid: STATUS_ERROR for sid in calls[2:]}}
    assert len(calls) == 5


def test_a_stop_in_the_second_half_of_a_halved_batch_keeps_the_first_half(tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    from capture import runner

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    original = CaptureRunner._forward

    def fails_from_t2(self, batch_samples):
        if any(s.meta["index"] >= 2 for s in batch_samples):
            raise ValueError("shapes do not match")
        return original(self, batch_samples)

    monkeypatch.setattr(CaptureRunner, "_forward", fails_from_t2)
    monkeypatch.setattr(runner, "MAX_ERRORS_IN_A_ROW", 2)
    cfg = _cfg(path, batch_size=4)
    spec = make_spec(cfg, loaded, n_total=4)
    samples = [dict(s, question="what is it?") for s in _samples(4)]  # one length: one batch of 4
    with pytest.raises(GapError, match="failed on 2 samples in a row"):
        with RunWriter(tmp_path / "run", spec) as writer:
            CaptureRunner(loaded, cfg, spec, writer).run(samples)
    ds = open_run(tmp_path / "run")
    # [0 1 2 3] fails -> [0 1] captured, [2 3] fails -> 2 and 3 fail alone: the shard stops
    assert dict(zip(ds["sample_id"].values, ds["status"].values)) == {
        "t/0": "ok", "t/1": "ok", "t/2": STATUS_ERROR, "t/3": STATUS_ERROR}


def test_a_setup_error_stops_the_shard_at_once(tiny_checkpoint, tmp_path):
    # a GapError is the run's own fault, not a sample's: no halving, no failed records
    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    cfg = _cfg(path, batch_size=2, causal={"methods": ["swap"]})
    spec = make_spec(cfg, loaded, n_total=4)
    with pytest.raises(GapError, match="'swap' needs the dataset"):
        with RunWriter(tmp_path / "run", spec) as writer:
            CaptureRunner(loaded, cfg, spec, writer).run(_samples(4))  # no donor_source
    assert RunWriter.committed_in(tmp_path / "run", 0, 1) == set()


def test_knockout_under_flash_attention_stops_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    import capture.attention

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    monkeypatch.setattr(capture.attention, "attention_implementation", lambda model: "flash_attention_2")
    cfg = _cfg(path, truncation={"modes": ["knockout"]})
    spec = make_spec(cfg, loaded, n_total=4)
    with pytest.raises(GapError, match=r"^model.attn_implementation 'flash_attention_2': attention knockout"):
        with RunWriter(tmp_path / "run", spec) as writer:
            CaptureRunner(loaded, cfg, spec, writer)


def test_a_processor_that_cannot_encode_fails_the_sample_and_in_a_row_stops_the_shard(
        tiny_checkpoint, tmp_path, monkeypatch):
    # encode_sample's GapError (the processor or template against this text) is no data error:
    # the sample is retryable, and many in a row mean the processor is wrong, not the samples
    import capture.prompts
    from capture import runner

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    real = capture.prompts.encode_sample
    broken = {1}

    def encode(processor, image_token_id, item):
        if item["index"] in broken:
            raise GapError(f"sample {item['sample_id']}: the processor's tokens do not match the prompt's")
        return real(processor, image_token_id, item)

    monkeypatch.setattr(capture.prompts, "encode_sample", encode)
    monkeypatch.setattr(runner, "MAX_ERRORS_IN_A_ROW", 3)
    cfg = _cfg(path, batch_size=1)
    stats, ds = _capture(loaded, cfg, _samples(4), tmp_path / "run")
    assert dict(zip(ds["sample_id"].values, ds["status"].values)) == {
        "t/0": "ok", "t/1": STATUS_ERROR, "t/2": "ok", "t/3": "ok"}
    assert stats.n_bad == 1  # exit 1: not every sample is ok or failed for a data reason
    broken.update({3, 4, 5, 6})
    spec = make_spec(cfg, loaded, n_total=8)
    with pytest.raises(GapError, match=r"^the processor failed on 3 samples in a row \(last, t/5: GapError: sample t/5"):
        with RunWriter(tmp_path / "run2", spec) as writer:
            CaptureRunner(loaded, cfg, spec, writer).run(_samples(8), window=2)
    status = dict(zip(*(open_run(tmp_path / "run2")[k].values for k in ("sample_id", "status"))))
    assert status["t/3"] == status["t/4"] == status["t/5"] == STATUS_ERROR and status["t/0"] == "ok"


def test_an_unreadable_swap_donor_is_replaced_and_costs_the_sample_nothing(tiny_checkpoint, tmp_path):
    from capture.causal import donor_rows
    from capture.datasets import DataError

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(4)
    first, second = donor_rows(0, 4)[:2]

    class Source:  # the dataset, with unreadable rows
        def __init__(self, bad):
            self.bad = bad

        def __len__(self):
            return len(samples)

        def __getitem__(self, row):
            if row in self.bad:
                raise DataError(f"t/{row}", "cannot decode image")
            return samples[row]

    cfg = _cfg(path, batch_size=2, causal={"methods": ["swap", "zero"], "layers": [1]})
    stats, ds = _capture(loaded, cfg, samples[:1], tmp_path / "run", donor_source=Source({first}))
    assert stats.n_ok == 1 and ds["status"].values[0] == "ok" and ds["error"].values[0] == ""
    assert ds["swap_donor"].values[0] == f"t/{second}"  # the next candidate stood in
    assert np.isfinite(ds["delta"].sel(layer=1).values).all() and int(ds.sizes["token"]) > 0  # hidden kept
    # no usable donor at all: swap NaN, the sample still ok with its other values and hidden
    stats, ds = _capture(loaded, cfg, samples[:1], tmp_path / "run2", donor_source=Source({1, 2, 3}))
    assert stats.n_ok == 1 and ds["swap_donor"].values[0] == "" and int(ds.sizes["token"]) > 0
    assert np.isnan(ds["delta"].sel({"layer": 1, "method": "swap"}).values).all()
    assert np.isfinite(ds["delta"].sel({"layer": 1, "method": "zero"}).values).all()


def test_a_swap_donor_showing_the_same_image_is_passed_over(tiny_checkpoint, tmp_path):
    # Several questions of one image: swapping its visual states for identical ones is a no-op
    from capture.causal import donor_rows

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(4)
    first, second = donor_rows(0, 4)[:2]
    samples[first] = {**samples[first], "image": samples[0]["image"].copy()}
    cfg = _cfg(path, batch_size=2, causal={"methods": ["swap"], "layers": [0, 1]})
    stats, ds = _capture(loaded, cfg, samples[:1], tmp_path / "run", donor_source=samples)
    assert ds["swap_donor"].values[0] == f"t/{second}"
    assert np.abs(ds["delta"].sel({"method": "swap", "channel": "visual"}).values).max() > 1e-6


def test_samples_are_read_and_encoded_ahead_on_their_own_thread(tiny_checkpoint, tmp_path, monkeypatch):
    # The capture loop's thread only feeds the model; an error of the items' iterator still
    # surfaces in it, after the samples before it, and no reader thread outlives the run.
    import threading

    import capture.prompts
    from schemas.errors import GapError

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    real, threads = capture.prompts.encode_sample, []

    def encode(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(capture.prompts, "encode_sample", encode)
    stats, ds = _capture(loaded, _cfg(path, batch_size=2), _samples(4), tmp_path / "run")
    assert stats.n_ok == 4 and set(threads) == {"gap-encode"} and len(threads) == 4

    def items():
        yield from _samples(3)
        raise GapError("t/3: sample index 3 requested twice")

    cfg = _cfg(path, batch_size=2)
    spec = make_spec(cfg, loaded, n_total=4)
    with RunWriter(tmp_path / "run2", spec) as writer, pytest.raises(GapError, match="requested twice"):
        CaptureRunner(loaded, cfg, spec, writer).run(items())
    assert "gap-encode" not in {t.name for t in threading.enumerate()}


def test_the_encoder_process_gives_the_same_records_and_a_lost_one_leaves_the_work_to_the_thread(
        tiny_checkpoint, tmp_path, monkeypatch, caplog):
    # On a GPU the processor runs in a worker process (the GIL stays with the loop); what it
    # encodes must be what the thread encodes, bad samples included, and if it dies the run goes
    # on with the thread.
    import os
    import signal

    import capture.prompts
    import capture.runner
    from capture.datasets import DataError

    path = tiny_checkpoint("qwen2_vl", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(4)
    samples[2]["image"] = _truncated_image()
    samples.append(DataError("t/9", "image file is truncated", index=4))
    real, on_this_process = capture.prompts.encode_sample, []

    def encode(*args, **kwargs):  # a spawned process imports the real one, not this
        on_this_process.append(args[2]["sample_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(capture.prompts, "encode_sample", encode)
    cfg = _cfg(path, batch_size=2)
    _, by_thread = _capture(loaded, cfg, samples, tmp_path / "thread", encode_in_process=False)
    assert len(on_this_process) == 4
    on_this_process.clear()
    spec = make_spec(cfg, loaded, n_total=len(samples))
    with RunWriter(tmp_path / "process", spec) as writer, \
            CaptureRunner(loaded, cfg, spec, writer, encode_in_process=True) as runner:
        workers = list(runner._encoder_process._pool._processes.values())
        stats = runner.run(samples)
    # an image that cannot be read cannot travel either (pickling reads it): the thread encodes
    # that one, to the same failed record
    assert on_this_process == ["t/2"] and stats.n_ok == 3 and stats.n_failed == 2
    assert not any(w.is_alive() for w in workers)  # close() ended it
    by_process = open_run(tmp_path / "process")
    for name in ("sample_id", "status", "error", "input_ids", "is_visual", "position"):
        np.testing.assert_array_equal(by_process[name].values, by_thread[name].values)
    np.testing.assert_array_equal(by_process["hidden"].values, by_thread["hidden"].values)

    spec = make_spec(cfg, loaded, n_total=len(samples))
    with RunWriter(tmp_path / "lost", spec) as writer, \
            CaptureRunner(loaded, cfg, spec, writer, encode_in_process=True) as runner:
        for worker in runner._encoder_process._pool._processes.values():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()
        with caplog.at_level("WARNING", logger="gap.capture"):
            stats = runner.run(samples)
    assert stats.n_ok == 3 and stats.n_failed == 2 and len(on_this_process) == 1 + 4
    assert "the encoder process stopped" in caplog.text
    np.testing.assert_array_equal(open_run(tmp_path / "lost")["hidden"].values, by_thread["hidden"].values)

    def no_start(encode):
        raise TimeoutError("no answer in 600 s")

    monkeypatch.setattr(capture.runner, "EncoderProcess", no_start)
    with RunWriter(tmp_path / "unstarted", spec) as writer, caplog.at_level("WARNING", logger="gap.capture"), \
            CaptureRunner(loaded, cfg, spec, writer, encode_in_process=True) as runner:
        stats = runner.run(samples)
    assert stats.n_ok == 3 and "the encoder process did not start (TimeoutError: no answer in 600 s)" in caplog.text


def test_stop_request_ends_after_the_current_batch(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    calls = []
    stats, ds = _capture(loaded, _cfg(path, batch_size=2), _samples(4), tmp_path / "run",
                         should_stop=lambda: calls.append(1) or len(calls) > 1)
    assert stats.stopped_early and stats.n_ok == 2
    # one batch of two (the two shortest prompts) is in the store, the rest left for --resume
    assert ds.sizes["sample"] == 2 and set(ds["status"].values) == {"ok"}


def _cli_config(tiny_checkpoint, tmp_path, limit: int):
    """A `gap capture` config file: a 2-layer tiny LLaVA over ``limit`` synthetic samples, batches of 2."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_checkpoint("llava", n_layers=2)), "dtype": "float32"},
                                      "data": {"name": "synthetic", "limit": limit},
                                      "capture": {"batch_size": 2}}))
    return config


def test_cli_stops_on_sigusr1_and_resumes(tiny_checkpoint, tmp_path, monkeypatch, capsys, signal_handlers):
    import os
    import signal

    from capture import cli

    config = _cli_config(tiny_checkpoint, tmp_path, limit=6)
    original = CaptureRunner._finish

    def finish_then_signal(self, flight):
        original(self, flight)
        os.kill(os.getpid(), signal.SIGUSR1)  # like Slurm's --signal before the time limit

    monkeypatch.setattr(CaptureRunner, "_finish", finish_then_signal)
    rc = cli.main([str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "stopped early; rerun with --resume" in out
    first = open_run(tmp_path / "run").sizes["sample"]
    assert 2 <= first < 6
    # no bar: a progress line after the first sample, then one a minute (none more here)
    assert [line for line in out.splitlines() if "samples done" in line] == [
        line for line in out.splitlines() if line.startswith("gap capture: 1 of 6 samples done (0 failed), ")]
    assert out.count("samples done") == 1
    monkeypatch.setattr(CaptureRunner, "_finish", original)
    monkeypatch.setattr(cli, "PROGRESS_LINE_S", 0.0)  # a line per sample
    assert cli.main([str(config), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    ds = open_run(tmp_path / "run")
    assert sorted(ds["sample_index"].values.tolist()) == list(range(6))
    out = capsys.readouterr().out
    assert f"{6 - first} of 6 samples to do" in out
    done = [line.split(" samples done")[0] for line in out.splitlines() if "samples done" in line]
    assert done == [f"gap capture: {k} of {6 - first}" for k in range(1, 7 - first)]
    assert "gap capture: store: " in out and "the model waited for it " in out


def test_resume_refuses_other_prompts(tiny_checkpoint, tmp_path, monkeypatch, signal_handlers):
    # A resumed run must not mix two ways of prompting: samples captured before and after a
    # change of gap's prompt format or of the checkpoint's chat template would differ silently.
    import json
    import shutil

    import yaml

    import capture.prompts
    from capture import cli

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("llava", n_layers=2), checkpoint)
    config = _cli_config(tiny_checkpoint, tmp_path, limit=2)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()),
                                      "model": {"path": str(checkpoint), "dtype": "float32"}}))
    run = tmp_path / "run"
    assert cli.main([str(config), "--out", str(run), "--no-progress"]) == 0
    assert json.loads(open_run(run).attrs["model_info"])["prompt_format"] == capture.prompts.PROMPT_FORMAT
    assert cli.main([str(config), "--out", str(run), "--resume", "--no-progress"]) == 0  # same prompts

    monkeypatch.setattr(capture.prompts, "PROMPT_FORMAT", capture.prompts.PROMPT_FORMAT + 1)
    with pytest.raises(GapError, match=r"'model\.prompt_format' differs"):
        cli.main([str(config), "--out", str(run), "--resume", "--no-progress"])
    monkeypatch.undo()

    template = checkpoint / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT:", "ASSISTANT :"))
    with pytest.raises(GapError, match=r"'model\.chat_template_sha256' differs"):
        cli.main([str(config), "--out", str(run), "--resume", "--no-progress"])


def test_retry_failed_recaptures_non_data_failures(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    # A sample that ran out of memory alone stays failed on a plain --resume; --retry-failed
    # captures it again, its new record replaces the failed one, and the run is whole.
    from capture import cli
    from store.inspect import run_info, verify_run

    config = _cli_config(tiny_checkpoint, tmp_path, limit=5)
    original = CaptureRunner._forward

    def oom_with_sample_2(self, batch_samples):
        if any(s.meta["index"] == 2 for s in batch_samples):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return original(self, batch_samples)

    monkeypatch.setattr(CaptureRunner, "_forward", oom_with_sample_2)
    run = tmp_path / "run"
    assert cli.main([str(config), "--out", str(run), "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "--resume --retry-failed" in printed.err
    assert "shard 0/1 holds 5 of 5 samples: ok 4, oom 1" in printed.out
    monkeypatch.setattr(CaptureRunner, "_forward", original)
    assert cli.main([str(config), "--out", str(run), "--resume", "--no-progress"]) == 1  # not retried
    assert "0 of 5 samples to do" in capsys.readouterr().out
    # a requeued task of a retry submission: the failure came after the submission, so it stays
    assert cli.main([str(config), "--out", str(run), "--resume", "--no-progress",
                     "--retry-failed-before", "2020-01-01T00:00:00+00:00"]) == 1
    assert "0 of 5 samples to do" in capsys.readouterr().out
    assert cli.main([str(config), "--out", str(run), "--resume", "--no-progress",
                     "--retry-failed-before", "2999-01-01T00:00:00"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 5 samples to do (1 failed ones again)" in printed
    assert "shard 0/1 holds 5 of 5 samples: ok 5" in printed
    assert verify_run(run) == []
    assert (run_info(run)["ok"], run_info(run)["failed"]) == (5, 0)
    fresh = tmp_path / "fresh"
    assert cli.main([str(config), "--out", str(fresh), "--no-progress"]) == 0
    ds, ref = open_run(run), open_run(fresh)
    assert list(ds["status"].values) == ["ok"] * 5 and ds.sizes["token"] == ref.sizes["token"]
    # float32 states; the retried sample ran alone, in the fresh run inside a padded batch
    np.testing.assert_allclose(ds["hidden"].values, ref["hidden"].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds["input_ids"].values, ref["input_ids"].values)


@pytest.fixture
def no_model(monkeypatch):
    """``gap capture`` must not load a model: ``load_model`` fails the test if it is called."""
    import capture.family

    def load_model(cfg):
        raise AssertionError("load_model was called")

    monkeypatch.setattr(capture.family, "load_model", load_model)


def _store_only_config(tmp_path):
    """A `gap capture` config whose checkpoint is never loaded (4 synthetic samples)."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "/models/never_loaded"},
                                      "data": {"name": "synthetic", "limit": 4}}))
    return config


def test_cli_out_that_is_a_file_fails_before_the_model_loads(tmp_path, no_model, signal_handlers):
    from capture import cli

    config = _store_only_config(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    with pytest.raises(GapError) as err:
        cli.main([str(config), "--out", str(afile)])
    assert str(err.value) == f"--out {afile}: exists and is not a directory"
    with pytest.raises(GapError) as err:
        cli.main([str(config), "--out", str(afile / "sub")])
    assert str(err.value) == f"--out {afile / 'sub'}: {afile} exists and is not a directory"


def test_cli_store_checks_fail_before_the_model_loads(tmp_path, no_model, signal_handlers):
    # what the run store and the config decide must not wait for a 30B checkpoint to load
    from capture import cli
    from schemas.config import load_config
    from schemas.run import failed_record
    from store.writer import RunSpec

    config = _store_only_config(tmp_path)
    run = tmp_path / "run"
    spec = RunSpec(config=load_config(config), model_info={"family": "toy"}, layers=[], hidden_size=4,
                   hidden_encoding="float32", n_total=4)
    with RunWriter(run, spec) as writer:
        writer.put(failed_record(0, "synthetic/test/0", "unreadable", status="data_error"))
    for args, message in [
            ([], f"shard 0/1 of {run} already has 1 committed samples; pass --resume to continue it"),
            (["--shard", "0/2"], f"{run} was started with 1 shards, not 2"),
            (["--resume", "--set", "data.limit=5"],
             (f"{run} was made with a different model or config: 'config.data.limit' differs; "
              "use another --out or the same config"))]:
        with pytest.raises(GapError) as err:
            cli.main([str(config), "--out", str(run), *args])
        assert str(err.value) == message


def test_cli_no_progress_silences_transformers_bars(tmp_path, monkeypatch, signal_handlers):
    # transformers' "Loading weights" bar is its own tqdm: --no-progress turns it off too
    from transformers.utils import logging as hf_logging

    import capture.family
    from capture import cli

    seen = []

    def load_model(cfg):
        seen.append(hf_logging.is_progress_bar_enabled())
        raise GapError("stop here")

    monkeypatch.setattr(capture.family, "load_model", load_model)
    config = _store_only_config(tmp_path)
    hf_logging.enable_progress_bar()  # an earlier --no-progress run in this process turned it off
    try:
        with pytest.raises(GapError, match="stop here"):
            cli.main([str(config), "--out", str(tmp_path / "run")])
        with pytest.raises(GapError, match="stop here"):
            cli.main([str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        hf_logging.enable_progress_bar()
    assert seen == [True, False]


def test_cli_summary_of_an_empty_shard(tiny_checkpoint, tmp_path, capsys, signal_handlers):
    from capture import cli

    config = _cli_config(tiny_checkpoint, tmp_path, limit=0)
    assert cli.main([str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "gap capture: shard 0/1 holds 0 of 0 samples" in lines


def test_writer_refuses_a_sample_committed_ok(tmp_path):
    from tests.storekit import make_record, make_spec as store_spec

    spec = store_spec(n_total=2)
    with RunWriter(tmp_path / "run", spec) as w:
        w.put(make_record(0, spec))
    with RunWriter(tmp_path / "run", spec, resume=True) as w:
        with pytest.raises(ValueError, match="toy/test/0 is already committed"):
            w.put(make_record(0, spec))
    # twice in one session, before any commit; a row of another shard
    spec = store_spec(n_total=4)
    with RunWriter(tmp_path / "run2", spec, shard=(0, 2)) as w:
        w.put(make_record(0, spec))
        with pytest.raises(ValueError, match="toy/test/0 is already committed"):
            w.put(make_record(0, spec))
        with pytest.raises(ValueError, match=r"\(row 1\) belongs to shard 1/2, not 0"):
            w.put(make_record(1, spec))
    assert list(open_run(tmp_path / "run2").sample_index.values) == [0]


def test_a_writer_that_fails_to_open_releases_its_shard(tmp_path):
    # a notebook that forgot --resume catches the error and opens the shard again
    from tests.storekit import make_record, make_spec as store_spec

    spec = store_spec(n_total=2)
    with RunWriter(tmp_path / "run", spec) as w:
        w.put(make_record(0, spec))
    try:
        RunWriter(tmp_path / "run", spec)
    except GapError as exc:
        kept = exc  # the traceback holds the failed writer's frame
    assert "pass --resume" in str(kept)
    with RunWriter(tmp_path / "run", spec, resume=True) as w:
        w.put(make_record(1, spec))
    assert sorted(open_run(tmp_path / "run").sample_index.values) == [0, 1]


@pytest.mark.parametrize("max_runs", [8, 0])
def test_layer_subset_and_float16_storage(tiny_checkpoint, tmp_path, max_runs, monkeypatch):
    from capture import runner

    monkeypatch.setattr(runner, "MAX_RUNS_PER_SAMPLE", max_runs)
    path = tiny_checkpoint("qwen3_vl", n_layers=3)
    loaded = load_model(_cfg(path).model)
    sample = _samples(1)[0]

    def hook(module, args, output):
        out = output.clone()
        out[0, 1, :3] = 1e6  # beyond float16's 65504: three clipped values per stored layer
        return out

    handle = loaded.layers()[0].mlp.register_forward_hook(hook)
    try:
        cfg = _cfg(path, layers=[-1, 1], store_dtype="float16")
        _, ds = _capture(loaded, cfg, [sample], tmp_path / "run")
        _, ref, _ = _reference(loaded, sample)
    finally:
        handle.remove()
    assert ds["layer"].values.tolist() == [1, 2]
    hidden = ds["hidden"].values
    expect = np.clip(ref[2][0].numpy(), -65504, 65504).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(hidden[0], expect)
    assert hidden[0][1, :3].tolist() == [65504.0] * 3
    last = loaded.final_norm()(torch.from_numpy(hidden[1]))
    np.testing.assert_allclose(last.detach().numpy(), ref[3][0].numpy(), atol=2e-2, rtol=2e-3)
    # the residual keeps the 1e6 values in both stored layers
    assert ds["fp16_overflow"].values.tolist() == [6]


def _question_mask(ids: np.ndarray, question_ids: list[int]) -> np.ndarray:
    """The one run of ``question_ids`` inside ``ids`` (the question as the tokenizer encodes it)."""
    m = len(question_ids)
    hits = [p for p in range(len(ids) - m + 1) if ids[p:p + m].tolist() == question_ids]
    assert len(hits) == 1, hits
    mask = np.zeros(len(ids), bool)
    mask[hits[0]:hits[0] + m] = True
    return mask


# max_runs 0: every layer's stored rows are gathered on the device before their one host copy
@pytest.mark.parametrize("family,padding_side,max_runs", [("llava", "right", 8), ("qwen2_vl", "left", 8),
                                                          ("qwen2_vl", "right", 0)])
def test_token_subset_stores_exactly_the_selected_tokens(tiny_checkpoint, family, padding_side, max_runs,
                                                         tmp_path, monkeypatch):
    from capture import runner
    from store.inspect import verify_run

    monkeypatch.setattr(runner, "MAX_RUNS_PER_SAMPLE", max_runs)

    path = tiny_checkpoint(family, n_layers=3)
    loaded = load_model(_cfg(path).model)
    samples = _samples(3)
    cfg = _cfg(path, batch_size=3, tokens=["text", "visual"])
    stats, ds = _capture(loaded, cfg, samples, tmp_path / "run", padding_side=padding_side)
    assert (stats.n_ok, stats.n_failed) == (3, 0) and verify_run(tmp_path / "run") == []
    hidden, token_sample = ds["hidden"].values, ds["token_sample"].values
    tok = loaded.processor.tokenizer
    for sample in samples:
        row = int(np.flatnonzero(ds["sample_index"].values == sample["index"])[0])
        sel = token_sample == row
        enc, ref, n_answer = _reference(loaded, sample)
        ids = enc["input_ids"][0].numpy()
        visual = ids == loaded.image_token_id
        question = _question_mask(ids[:len(ids) - n_answer],
                                  tok(sample["question"], add_special_tokens=False)["input_ids"])
        question = np.concatenate([question, np.zeros(n_answer, bool)])
        kept = np.flatnonzero(visual | question)
        assert 0 < question.sum() and 0 < visual.sum() and len(kept) < len(ids)  # a real subset
        assert ds["n_tokens"].values[row] == len(kept) == sel.sum()
        np.testing.assert_array_equal(ds["position"].values[sel], kept)  # the true positions
        np.testing.assert_array_equal(ds["input_ids"].values[sel], ids[kept])
        np.testing.assert_array_equal(ds["is_visual"].values[sel], visual[kept])
        np.testing.assert_array_equal(ds["is_text"].values[sel], question[kept])
        assert not ds["is_answer"].values[sel].any()
        states = hidden[:, sel]
        for layer in range(loaded.n_layers - 1):
            np.testing.assert_allclose(states[layer], ref[layer + 1][0].numpy()[kept], atol=2e-5, rtol=1e-4)
        last = loaded.final_norm()(torch.from_numpy(states[-1]))
        np.testing.assert_allclose(last.detach().numpy(), ref[-1][0].numpy()[kept], atol=2e-5, rtol=1e-4)
        # sample-level values do not depend on the token selection
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(**enc).logits[0].double(), -1)
        expect = sum(float(logp[p - 1, ids[p]]) for p in range(len(ids) - n_answer, len(ids)))
        assert ds["logp_clean"].values[row] == pytest.approx(expect, rel=1e-6)


def test_token_set_that_a_sample_lacks_stores_no_tokens(tiny_checkpoint, tmp_path):
    from store.inspect import verify_run

    path = tiny_checkpoint("llava", n_layers=2)
    loaded = load_model(_cfg(path).model)
    samples = _samples(2)
    samples[1]["image"] = None  # a text-only sample has no visual tokens to store
    stats, ds = _capture(loaded, _cfg(path, batch_size=2, tokens=["visual"]), samples, tmp_path / "run")
    assert (stats.n_ok, stats.n_failed) == (2, 0) and verify_run(tmp_path / "run") == []
    by_id = dict(zip(ds["sample_id"].values, ds["n_tokens"].values))
    assert by_id == {"t/0": 16, "t/1": 0}  # llava: 16 image tokens
    assert ds["is_visual"].values.all() and ds.sizes["token"] == 16 == ds["hidden"].shape[1]


def test_token_sets_config_errors_and_resume(tiny_checkpoint, tmp_path):
    from schemas.config import ConfigError
    from schemas.errors import GapError

    path = tiny_checkpoint("llava", n_layers=2)
    with pytest.raises(ConfigError, match="'capture.tokens'.*'visal' is not a token set"):
        _cfg(path, tokens=["visual", "visal"])
    with pytest.raises(ConfigError, match="'capture.tokens'.*non-empty"):
        _cfg(path, tokens=[])
    # one canonical spelling per selection: order and repeats do not matter, all four sets are "all"
    assert _cfg(path, tokens=["text", "visual", "text"]).capture.tokens == ["visual", "text"]
    assert _cfg(path, tokens=["other", "answer", "text", "visual"]).capture.tokens == "all"
    loaded = load_model(_cfg(path).model)
    samples = _samples(1)
    _capture(loaded, _cfg(path, tokens=["visual", "text"]), samples, tmp_path / "run")
    with pytest.raises(GapError, match="'config.capture.tokens' differs"):
        RunWriter(tmp_path / "run", make_spec(_cfg(path, tokens=["visual"]), loaded, 1), resume=True)
    # the same selection spelled differently resumes
    RunWriter(tmp_path / "run", make_spec(_cfg(path, tokens=["text", "visual"]), loaded, 1), resume=True).close()


def test_the_shipped_example_configs_load_and_the_tiny_one_runs(tiny_checkpoint, tmp_path):
    from capture import cli
    from schemas.config import load_config

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)  # valid against today's schema
    tiny = next(p for p in configs if p.name == "tiny_synthetic.yaml")
    path = tiny_checkpoint("qwen2_vl", n_layers=2)
    assert cli.main([str(tiny), "--out", str(tmp_path / "run"), "--no-progress", "--set", f"model.path={path}",
                     "--set", "data.limit=3"]) == 0
    ds = open_run(tmp_path / "run")
    assert list(ds.status.values) == ["ok"] * 3 and {"delta", "trunc_logp", "hidden"} <= set(ds.data_vars)
