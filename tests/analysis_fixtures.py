"""Small runs with known structure for the analysis tests, written through the real store writer.

``make_run`` plants: a modality cliff in ``delta`` (visual contribution 2.0 up to a per-sample
layer, 0 after), truncation results where hard samples fail when the image is cut at or before
their cliff, a massive "BOS" token at position 0 of every sample (norm x1000), one massive visual
token (sample 3, layer 2) and one failed sample.  It returns the raw float32 activations so tests
can recompute every metric directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas.config import config_from_dict
from schemas.run import SampleRecord, failed_record
from store.writer import RunSpec, RunWriter

LAYERS = [0, 1, 2, 3]
TRUNC_LAYERS = [-1, 0, 1, 2, 3]
MODES = ["knockout", "zero"]
METHODS = ["zero", "mean"]
CHANNELS = ["visual", "text"]


@dataclass
class Truth:
    hidden: dict[int, np.ndarray] = field(default_factory=dict)    # index -> (L, T, d) float32
    visual: dict[int, np.ndarray] = field(default_factory=dict)
    text: dict[int, np.ndarray] = field(default_factory=dict)
    cliff: dict[int, int] = field(default_factory=dict)
    subset: dict[int, str] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)


def _spec(n: int, d: int, block_tokens: int, generate: bool, activations: bool = True) -> RunSpec:
    cfg = config_from_dict({
        "model": {"path": "/models/toy"}, "data": {"name": "synthetic"},
        "capture": {"causal": {"methods": METHODS},
                    "truncation": {"modes": MODES, "layers": [0, 1, 2, 3],
                                   "score": ["logprob", "generate"] if generate else ["logprob"]}}})
    coords = {"layer": LAYERS, "method": METHODS, "channel": CHANNELS, "trunc_layer": TRUNC_LAYERS,
              "mode": MODES}
    return RunSpec(config=cfg, model_info={"family": "toy", "n_layers": len(LAYERS)},
                   layers=list(LAYERS) if activations else [],
                   hidden_size=d, hidden_encoding="float32", coords=coords, n_total=n,
                   block_tokens=block_tokens)


def make_run(path: str | Path, n: int = 14, d: int = 24, block_tokens: int = 16, failed: tuple = (5,),
             generate: bool = True, seed: int = 0, n_total: int | None = None,
             activations: bool = True, wrong: tuple = ()) -> tuple[Path, Truth]:
    """Write a run of ``n`` samples (``n_total`` declared, default ``n``) and return its truth.

    Samples in ``wrong`` answer wrongly under every truncation setting, the baseline included.
    """
    rng = np.random.default_rng(seed)
    spec = _spec(n_total or n, d, block_tokens, generate, activations)
    truth = Truth()
    with RunWriter(path, spec) as writer:
        for i in range(n):
            sid = f"synthetic/test/{i}"
            subset = "hard" if i % 2 else "easy"
            truth.subset[i] = subset
            if i in failed:
                truth.failed.add(i)
                writer.put(failed_record(i, sid, "image unreadable", question="q?", answers=["red"],
                                         subset=subset))
                continue
            n_vis, n_txt = int(rng.integers(6, 13)), int(rng.integers(3, 7))
            n_tok = 2 + n_vis + n_txt + 1
            visual = np.zeros(n_tok, bool)
            visual[2:2 + n_vis] = True
            text = np.zeros(n_tok, bool)
            text[2 + n_vis:2 + n_vis + n_txt] = True
            answer = np.zeros(n_tok, bool)
            answer[-1] = True
            base = rng.standard_normal((n_tok, d)).astype(np.float32)
            hidden = np.stack([base * (1 + 0.3 * l) + rng.standard_normal((n_tok, d)) * 0.5
                               for l in range(len(LAYERS))]).astype(np.float32)
            hidden[:, 0] *= 1000.0  # BOS: a massive activation outside both modalities
            if i == 3:
                hidden[2, 3] *= 5000.0  # one massive visual token
            cliff = int(rng.integers(0, 3))
            delta = np.zeros((len(LAYERS), len(METHODS), len(CHANNELS)))
            delta[: cliff + 1, :, 0] = 2.0
            delta[:, :, 1] = 0.5
            # hard samples fail when the image is cut at or before their cliff; easy never fail
            correct = np.array([[subset == "easy" or not (0 <= t <= cliff)] * len(MODES) for t in TRUNC_LAYERS])
            correct &= i not in wrong
            trunc_logp = np.where(correct, np.log(0.9), np.log(0.05))
            texts = np.where(correct, "red", "blue").astype(object)
            values = {"logp_clean": float(np.log(0.9)) - 0.1 * cliff, "delta": delta,
                      "logp_patched": -delta, "trunc_logp": trunc_logp}
            if generate:
                values["trunc_text"] = texts
            writer.put(SampleRecord(index=i, sample_id=sid, question="what colour?", answer="red",
                                    answers=["red"], subset=subset,
                                    input_ids=np.arange(n_tok, dtype=np.int32),
                                    position=np.arange(n_tok, dtype=np.int32), is_visual=visual,
                                    is_text=text, is_answer=answer, hidden=hidden if activations else None,
                                    values=values))
            truth.hidden[i], truth.visual[i], truth.text[i], truth.cliff[i] = hidden, visual, text, cliff
    return Path(path), truth
