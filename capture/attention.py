"""Per-layer attention restrictions: keep chosen key positions out of every query's view.

transformers builds one 4-D attention mask per forward and hands the same object to every
decoder layer, so a per-layer restriction ("no position may attend to visual tokens in layers
above L") is applied by rewriting the ``attention_mask`` keyword argument of the chosen decoder
layers with a forward pre-hook. The rewrite works for the mask forms of the ``eager`` attention
(additive float mask) and ``sdpa`` (boolean mask, or None when sdpa relies on ``is_causal``), and
it runs on every call, so it persists through cached greedy decoding: there the query is the
newest token and the blocked keys are still at their prefill indices in the cache.

Flash and flex attention take no 4-D mask; :func:`check_attention_implementation` rejects them.

Examples
--------
>>> import torch
>>> m = block_keys(None, torch.tensor([[False, True, False]]), q_len=3)
>>> m[0, 0].int().tolist()      # causal, key 1 blocked except for query 1 itself
[[1, 0, 0], [1, 1, 0], [1, 0, 1]]
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from schemas.errors import GapError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

MASKED_ATTENTION = ("eager", "sdpa")


def attention_implementation(model: Any) -> str:
    """The attention implementation of the model's language model (``eager`` when unset)."""
    config = getattr(model, "config", None)
    return getattr(getattr(config, "text_config", config), "_attn_implementation", None) or "eager"


def check_attention_implementation(model: Any) -> str:
    """The model's attention implementation, if per-layer masks can restrict it.

    Raises
    ------
    GapError
        For implementations that take no 4-D mask (flash attention, flex attention).
    """
    impl = attention_implementation(model)
    if impl not in MASKED_ATTENTION:
        raise GapError(f"model.attn_implementation {impl!r}: attention knockout needs one of "
                       f"{', '.join(MASKED_ATTENTION)}")
    return impl


def block_keys(mask: "torch.Tensor | None", blocked: "torch.Tensor", q_len: int,
               dtype: "torch.dtype | None" = None, n_keys: int | None = None) -> "torch.Tensor":
    """Return ``mask`` with the ``blocked`` key positions removed from every query's view.

    A blocked key stays visible to the query at its own index: every query keeps at least one
    key, so no softmax row is empty (an all-masked row yields NaN, and NaN values leak through
    zero attention weights). Only the blocked tokens' own states see it, and nothing else
    attends to those.

    Parameters
    ----------
    mask
        The attention mask a decoder layer receives: ``None`` (plain causal), boolean
        ``(B, 1, Q, K)`` (True = may attend) or an additive float ``(B, 1, Q, K)``.
    blocked
        ``(B, K0)`` or ``(1, K0)`` boolean, the keys to hide; ``K0 <= K``, keys past ``K0``
        (decoded tokens) are never blocked.
    q_len
        ``Q``; the queries are the last ``Q`` of the ``K`` key positions (true for a prefill
        and for cached decoding without padding, the only case where ``mask`` is None).
    dtype
        Float dtype of the result when ``mask`` is None and a float mask is wanted; by
        default the result of a None mask is boolean.
    n_keys
        ``K`` when ``mask`` is None (cached decoding: past length + ``q_len``); default
        ``max(K0, q_len)``.

    Returns
    -------
    torch.Tensor
        A mask of the same kind as ``mask`` (boolean for None unless ``dtype`` is given).

    Examples
    --------
    >>> import torch
    >>> float_mask = torch.zeros(1, 1, 1, 3)          # one decoding query, 3 cached keys
    >>> block_keys(float_mask, torch.tensor([[True, False]]), q_len=1)[0, 0, 0, 0].item() < -1e30
    True
    """
    import torch

    device = blocked.device if mask is None else mask.device
    if mask is not None:
        n_keys = int(mask.shape[-1])
    elif n_keys is None:
        n_keys = max(int(blocked.shape[-1]), q_len)
    n_rows = max(int(blocked.shape[0]), int(mask.shape[0]) if mask is not None else 1)
    keys = torch.zeros(blocked.shape[0], n_keys, dtype=torch.bool, device=device)
    width = min(n_keys, int(blocked.shape[-1]))
    keys[:, :width] = blocked[:, :width].to(device)
    key_idx = torch.arange(n_keys, device=device)
    query_idx = key_idx[n_keys - q_len:]
    diagonal = query_idx[:, None] == key_idx[None, :]                      # (Q, K)
    hide = keys[:, None, None, :] & ~diagonal[None, None]                  # (B, 1, Q, K)
    if mask is None:
        allowed = (key_idx[None, :] <= query_idx[:, None])[None, None] & ~hide
        allowed = allowed.expand(n_rows, 1, q_len, n_keys)
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


@contextmanager
def knockout(layers: Sequence[Any], after: int, blocked: "torch.Tensor") -> Iterator[None]:
    """Hide the ``blocked`` keys from every query in the decoder layers with index > ``after``.

    Parameters
    ----------
    layers
        The decoder blocks (``LoadedModel.layers()``), called with an ``attention_mask``
        keyword argument (every supported family does).
    after
        Layers ``after + 1, ...`` are restricted; ``-1`` restricts all of them.
    blocked
        ``(B, K0)`` boolean key positions to hide (e.g. the visual tokens of each row), on
        any device.

    Examples
    --------
    See ``tests/test_truncation.py``: under this context a full forward equals the forward
    with the visual tokens physically dropped after ``after``.
    """
    handles = []

    def make_hook(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            hidden = args[0] if args else kwargs["hidden_states"]
            q_len = int(hidden.shape[1])
            mask = kwargs.get("attention_mask")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            # sdpa passes no mask in cached decoding: the keys are this layer's past plus the queries.
            past = int(cache.get_seq_length(index)) if cache is not None and mask is None else 0
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = block_keys(mask, blocked.to(hidden.device), q_len, n_keys=past + q_len)
            return args, kwargs
        return hook

    try:
        for index, layer in enumerate(layers):
            if index > after:
                handles.append(layer.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
