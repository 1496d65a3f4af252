"""The layer x layer CKA map of the geometry pass: minibatch CKA over the same tokens.

Nguyen et al. (2021): the unbiased HSIC of each minibatch, summed, then normalised.  Here a
minibatch is one sample's fixed subset of tokens of a modality (:func:`cka_token_subset`), the
same tokens at every layer, so each pair of layers compares the same tokens (RESEARCH.md 3b).
The geometry pass reads groups of layers, so each sample's token Gram matrices wait in memory maps
(:class:`TokenGrams`) until :func:`layer_cka` forms the map; no d x d matrix per pair of layers
and no layer of a sample held beside another.

Examples
--------
>>> cka_token_subset(3, 64, 7).tolist(), len(cka_token_subset(600, 64, 7))
([0, 1, 2], 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analyze.metrics import hsic_matrix, minibatch_cka
from schemas.config import AnalysisConfig

__all__ = ["CKA_TOKENS", "TokenGrams", "cka_token_subset", "layer_cka"]

CKA_TOKENS = AnalysisConfig().cka_tokens  # per sample and modality (a minibatch each)


def cka_token_subset(n_tokens: int, k: int, sample: int) -> np.ndarray:
    """Which of a sample's ``n_tokens`` tokens of one modality enter the layer x layer CKA:
    all when there are at most ``k``, else ``k`` of them fixed by the sample's position.
    """
    if n_tokens <= k:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng([sample, n_tokens]).choice(n_tokens, size=k, replace=False))


@dataclass
class TokenGrams:
    """Memory maps of the CKA tokens' Gram matrices ``(n, 2, L, K, K)`` and massive flags."""

    gram: np.ndarray
    heavy: np.ndarray

    @classmethod
    def open(cls, scratch: Path, mode: str, n: int, n_layers: int, k: int) -> "TokenGrams":
        """The maps in ``scratch``: created (``mode`` ``w+``) or reopened to resume (``r+``)."""
        return cls(np.lib.format.open_memmap(scratch / "cka_gram.npy", mode=mode, dtype=np.float32,
                                             shape=(n, 2, n_layers, k, k)),
                   np.lib.format.open_memmap(scratch / "cka_heavy.npy", mode=mode, dtype=bool,
                                             shape=(n, 2, n_layers, k)))

    @property
    def tokens(self) -> int:
        return self.gram.shape[-1]

    def flush(self) -> None:
        self.gram.flush()
        self.heavy.flush()


def layer_cka(grams: TokenGrams, n_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minibatch CKA per modality and variant ``(2, 2, L, L)``, each sample's CKA tokens one
    minibatch, and how many samples entered each.  ``n_tokens`` ``(n, 2)``: the samples' tokens
    per modality.  Without massive tokens, a token massive at any layer is left out at all of
    them (the same tokens throughout); a minibatch needs 4 tokens."""
    n, _, n_layers, k, _ = grams.gram.shape
    total = np.zeros((2, 2, n_layers, n_layers))
    used = np.zeros((2, 2), np.int64)
    for s in range(n):
        for m in range(2):
            c = min(int(n_tokens[s, m]), k)
            if c < 4:
                continue
            gram = np.asarray(grams.gram[s, m, :, :c, :c], dtype=np.float64)
            keep = ~np.asarray(grams.heavy[s, m, :, :c]).any(axis=0)
            for v, rows in enumerate((np.ones(c, bool), keep)):
                if rows.sum() >= 4:
                    total[m, v] += hsic_matrix(gram if rows.all() else gram[:, rows][:, :, rows])
                    used[m, v] += 1
    return np.array([[minibatch_cka(total[m, v]) for v in range(2)] for m in range(2)]), used
