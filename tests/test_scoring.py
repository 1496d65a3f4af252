"""Teacher-forced answer scoring: alignment by hand, padding, and agreement with step-by-step decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capture.scoring import (answer_logprob, answer_token_logprobs, gathered_logprobs, predicting_positions,
                             scored_positions)


def one_hot_logits(seq: int, vocab: int, picks: dict[int, tuple[int, float]]) -> torch.Tensor:
    """Logits that are 0 everywhere except ``logits[pos, tok] = value`` for each pick."""
    logits = torch.zeros(1, seq, vocab, dtype=torch.float64)
    for pos, (tok, value) in picks.items():
        logits[0, pos, tok] = value
    return logits


def test_answer_read_at_the_predicting_position():
    # prompt [7, 8, 9], answer [2, 3] at indices 3 and 4; vocab 5.
    ids = torch.tensor([[7 % 5, 8 % 5, 9 % 5, 2, 3]])
    is_answer = torch.tensor([[False, False, False, True, True]])
    # Position 2 predicts the first answer token with logit ln(3): p = 3 / (3 + 4) = 3/7.
    # Position 3 predicts the second with logit ln(5): p = 5 / 9.
    # Positions 3 and 4 themselves carry decoys that an off-by-one reading would pick up.
    logits = one_hot_logits(5, 5, {2: (2, math.log(3)), 3: (3, math.log(5)), 4: (3, 50.0)})
    logits[0, 3, 2] = 50.0  # decoy: reading the answer token's own position would score ~0
    expected_first = math.log(3 / 7)
    expected_second = 5 / (5 + 3 + math.exp(50.0))  # the decoy is in the second row's softmax
    got = answer_token_logprobs(logits, ids, is_answer)
    assert got.dtype == torch.float64
    assert got[0].item() == pytest.approx(expected_first, abs=1e-9)
    assert got[1].item() == pytest.approx(math.log(expected_second), abs=1e-6)
    assert answer_logprob(logits, ids, is_answer).item() == pytest.approx(
        expected_first + math.log(expected_second), abs=1e-6)


def test_single_token_answer_uses_previous_logits():
    ids = torch.tensor([[0, 1, 4]])
    is_answer = torch.tensor([[False, False, True]])
    logits = one_hot_logits(3, 5, {1: (4, math.log(6))})  # p = 6 / (6 + 4) = 0.6
    assert answer_logprob(logits, ids, is_answer).item() == pytest.approx(math.log(0.6), abs=1e-9)


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_left_and_right_padding_give_the_same_score(pad):
    rng = np.random.default_rng(pad)
    seq, vocab = 6, 11
    core_logits = torch.tensor(rng.normal(size=(seq, vocab)), dtype=torch.float32)
    core_ids = torch.tensor(rng.integers(vocab, size=seq))
    core_answer = torch.tensor([False, False, False, True, True, True])
    unpadded = answer_logprob(core_logits[None], core_ids[None], core_answer[None]).item()
    # Build a batch of two rows: row 0 right-padded, row 1 left-padded, with junk in the pads.
    width = seq + pad
    logits = torch.tensor(rng.normal(size=(2, width, vocab)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(vocab, size=(2, width)))
    mask = torch.zeros(2, width, dtype=torch.bool)
    logits[0, :seq], ids[0, :seq], mask[0, :seq] = core_logits, core_ids, core_answer
    logits[1, pad:], ids[1, pad:], mask[1, pad:] = core_logits, core_ids, core_answer
    got = answer_logprob(logits, ids, mask)
    assert got.tolist() == pytest.approx([unpadded, unpadded], abs=1e-9)
    # the logits of the scored positions alone (a forward's logits_to_keep) give the same scores
    kept = scored_positions(mask)
    assert kept.tolist() == sorted({2, 3, 4, pad + 2, pad + 3, pad + 4})
    assert answer_logprob(logits[:, kept], ids, mask, kept).tolist() == pytest.approx(got.tolist(), abs=1e-12)
    # Independent sum of the three predicting positions of the unpadded row.
    lp = torch.log_softmax(core_logits.double(), -1)
    assert unpadded == pytest.approx(sum(lp[p - 1, core_ids[p]].item() for p in (3, 4, 5)), abs=1e-9)


def test_rows_without_answer_are_nan_and_index_zero_is_refused():
    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[False, True, False], [False, False, False]])
    out = answer_logprob(torch.zeros(2, 3, 4), ids, mask)
    assert out[0].item() == pytest.approx(-math.log(4))
    assert math.isnan(out[1].item())
    with pytest.raises(ValueError, match="index 0"):
        predicting_positions(torch.tensor([True, False]))


def test_gathered_logprobs_is_float64_even_for_bfloat16():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.bfloat16)
    got = gathered_logprobs(logits, torch.tensor([2]))
    ref = 2.0 - math.log(1 + math.e + math.e ** 2)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(ref, abs=1e-9)


def test_model_score_equals_step_by_step_decoding(tiny_checkpoint):
    """On a real tiny model: the teacher-forced sum equals scoring each answer token after
    feeding exactly its prefix (no answer token after it), in padded batches of both sides."""
    from PIL import Image

    from capture.family import load_model
    from capture.prompts import collate, encode_sample
    from schemas.config import ModelConfig

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(path=str(tiny_checkpoint("llava", n_layers=2)), dtype="float32"))
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8"))
    samples = [encode_sample(loaded.processor, loaded.image_token_id,
                             {"index": i, "sample_id": f"s/{i}", "image": image, "question": q, "answer": a})
               for i, (q, a) in enumerate([("what colour is the square ?", "red square left"),
                                           ("how many ?", "two")])]
    step_scores = []
    for s in samples:
        total = 0.0
        n_prompt = int(np.flatnonzero(s.is_answer)[0])
        for j, token in enumerate(s.answer_ids):
            cut = n_prompt + j  # prefix only: prompt and the answer tokens before a_j
            inputs = {k: (v[:, :cut] if k in ("input_ids", "attention_mask") else v) for k, v in s.inputs.items()}
            with torch.no_grad():
                logits = loaded.model(**inputs).logits
            total += torch.log_softmax(logits[0, -1].double(), -1)[int(token)].item()
        step_scores.append(total)
    for side in ("left", "right"):
        batch = collate(samples, loaded.pad_token_id, padding_side=side)
        with torch.no_grad():
            logits = loaded.model(**loaded.forward_inputs(batch.inputs)).logits
        mask = torch.zeros(batch.inputs["input_ids"].shape, dtype=torch.bool)
        for i, s in enumerate(samples):
            mask[i, batch.token_slice(i)] = torch.from_numpy(s.is_answer)
        got = answer_logprob(logits, batch.inputs["input_ids"], mask)
        assert got.tolist() == pytest.approx(step_scores, abs=1e-4), side
