"""Teacher-forced answer scoring: the summed log-probability of the gold answer tokens.

The prompt is followed by the gold answer (see :mod:`capture.prompts`), so answer token ``a_i`` at
sequence index ``p`` is predicted by the logits at index ``p - 1``. Reading the logits at ``p``
itself (or the last ``len(answer)`` logits of a prompt without the answer, the earlier
prototype's mistake) scores the wrong tokens. Everything here works on per-token masks, so left
and right padding need no special case: a padded row simply has its answer tokens elsewhere.

Examples
--------
>>> import torch
>>> logits = torch.zeros(1, 3, 4)
>>> logits[0, 1, 2] = 10.0          # position 1 predicts token 2 (the answer at index 2)
>>> answer_logprob(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[False, False, True]])).item() > -1e-3
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def predicting_positions(is_answer: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Rows and positions whose logits predict an answer token.

    Parameters
    ----------
    is_answer
        ``(B, T)`` or ``(T,)`` boolean mask of the answer tokens.

    Returns
    -------
    rows, positions
        1-D index tensors (row-major order): the answer token at ``(row, position + 1)`` is
        predicted by the logits at ``(row, position)``.

    Raises
    ------
    ValueError
        When an answer token sits at index 0 (nothing predicts it).

    Examples
    --------
    >>> import torch
    >>> predicting_positions(torch.tensor([[True, False]]))
    Traceback (most recent call last):
    ...
    ValueError: answer token at sequence index 0 of row 0: no position predicts it
    >>> rows, pos = predicting_positions(torch.tensor([[False, True, True], [False, False, True]]))
    >>> rows.tolist(), pos.tolist()
    ([0, 0, 1], [0, 1, 1])
    """
    mask = is_answer if is_answer.dim() == 2 else is_answer[None]
    rows, cols = mask.nonzero(as_tuple=True)
    first = cols == 0
    if bool(first.any()):
        raise ValueError(f"answer token at sequence index 0 of row {int(rows[first][0])}: "
                         "no position predicts it")
    return rows, cols - 1


def gathered_logprobs(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``log_softmax(logits)[target]`` per row, computed in float64.

    Parameters
    ----------
    logits
        ``(N, V)`` logits of the predicting positions (any float dtype).
    targets
        ``(N,)`` token ids.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float64 log-probabilities.

    Examples
    --------
    >>> import torch
    >>> import math
    >>> gathered_logprobs(torch.zeros(1, 4), torch.tensor([3])).item() == -math.log(4.0)
    True
    """
    import torch

    from capture.transfer import host_to_device

    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return lp.gather(-1, host_to_device(targets, lp.device).long()[:, None])[:, 0]


def scored_positions(is_answer: "torch.Tensor") -> "torch.Tensor":
    """The sequence indices whose logits the answer scores read, sorted, for all rows at once.

    Passed to a forward as ``logits_to_keep``, the LM head projects these few positions instead
    of all ``T`` (a ``(B, T, V)`` logits tensor of a 150k vocabulary is ~0.3 MB per token);
    the scores then take them as ``positions``.

    >>> import torch
    >>> scored_positions(torch.tensor([[False, True, True], [False, False, True]])).tolist()
    [0, 1]
    """
    import torch

    _, pos = predicting_positions(is_answer)
    return torch.unique(pos)


def answer_token_logprobs(logits: "torch.Tensor", input_ids: "torch.Tensor",
                          is_answer: "torch.Tensor", positions: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Per-token log-probabilities of the answer tokens, row-major (float64).

    Parameters
    ----------
    logits
        ``(B, T, V)`` logits of the full sequences, or ``(B, len(positions), V)``.
    input_ids
        ``(B, T)`` token ids (the answer appended to the prompt).
    is_answer
        ``(B, T)`` boolean answer mask.
    positions
        The sequence indices ``logits``' axis 1 holds (:func:`scored_positions`, or a superset of
        it, sorted); None when it holds all ``T``.

    Returns
    -------
    torch.Tensor
        ``(n_answer_tokens,)``: ``log p(a_i | prefix)`` for every marked token, rows in order.

    Examples
    --------
    >>> import torch
    >>> logits = torch.full((1, 3, 4), -1e4); logits[0, 0, 1] = 0; logits[0, 1, 3] = 0
    >>> answer_token_logprobs(logits, torch.tensor([[2, 1, 3]]), torch.tensor([[False, True, True]])).tolist()
    [0.0, 0.0]
    """
    import torch

    from capture.transfer import host_to_device

    rows, pos = predicting_positions(is_answer)
    targets = input_ids[host_to_device(rows, input_ids.device), host_to_device(pos + 1, input_ids.device)]
    cols = pos if positions is None else torch.searchsorted(positions.to(pos.device), pos)
    return gathered_logprobs(logits[host_to_device(rows, logits.device), host_to_device(cols, logits.device)],
                             targets)


def answer_logprob(logits: "torch.Tensor", input_ids: "torch.Tensor", is_answer: "torch.Tensor",
                   positions: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Summed teacher-forced log-probability of each row's answer, ``s = sum_i log p(a_i | prefix)``.

    Parameters
    ----------
    logits
        ``(B, T, V)`` logits, or ``(B, len(positions), V)``.
    input_ids
        ``(B, T)`` token ids with the answer appended (left or right padded).
    is_answer
        ``(B, T)`` boolean answer mask; a row without answer tokens scores NaN.
    positions
        As in :func:`answer_token_logprobs`.

    Returns
    -------
    torch.Tensor
        ``(B,)`` float64.

    Examples
    --------
    >>> import torch
    >>> logits = torch.zeros(2, 3, 2)                       # uniform: log(1/2) per token
    >>> ids = torch.tensor([[0, 1, 1], [5, 0, 1]])           # row 1 is left padded by one
    >>> mask = torch.tensor([[False, True, True], [False, False, True]])
    >>> [round(x, 4) for x in answer_logprob(logits, ids, mask).tolist()]
    [-1.3863, -0.6931]
    """
    import torch

    from capture.transfer import host_to_device

    rows, _ = predicting_positions(is_answer)
    per_token = answer_token_logprobs(logits, input_ids, is_answer, positions)
    n_rows = input_ids.shape[0] if input_ids.dim() == 2 else 1
    total = torch.zeros(n_rows, dtype=torch.float64, device=per_token.device)
    rows = host_to_device(rows, per_token.device)
    total.index_add_(0, rows, per_token)
    has = torch.zeros(n_rows, dtype=torch.bool, device=per_token.device)
    has[rows] = True
    return torch.where(has, total, torch.full_like(total, float("nan")))
