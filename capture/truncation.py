"""Visual truncation: take the image away after decoder layer ``L`` and score the answer.

Modes (RESEARCH.md section 2), for every layer ``k > L``:

- ``zero``: the visual-token states after block ``k`` are set to 0, DeepStack's additions
  (Qwen3-VL) included: blocks ``k + 1 ...`` attend to them as zero vectors;
- ``knockout``: no query may attend to a visual key (the attention mask of blocks ``k > L``,
  :mod:`capture.attention`); visual evidence reaches the answer only through what other positions
  absorbed up to ``L``;
- ``drop``: the visual tokens are removed from the sequence after block ``L``, every other token
  keeping its original position (rotary embeddings, Qwen's 3-D positions included). It equals
  ``knockout`` up to rounding, which the tests check on every layer.

Teacher-forced scores (``trunc_logp``) reuse the clean prefix like causal tracing: the rows of
one mode are the truncation layers, each starting from the cached clean output of block ``L``
(:meth:`capture.causal.Engine.run_suffix`). Greedy generation (``trunc_text``) runs the model's
own ``generate`` with hooks that stay active through cached decoding. ``trunc_layer = -1`` is the
untruncated baseline.

Examples
--------
>>> trunc_layer_coords([0, 3])
[-1, 0, 3]
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Sequence

import numpy as np

from capture.causal import Engine, InterventionResult, summarize_errors, with_answer
from schemas.errors import one_line

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from capture.family import LoadedModel
    from capture.prompts import Batch, PromptSample
    from schemas.config import TruncationConfig

log = logging.getLogger(__name__)

MODES = ("zero", "knockout", "drop")


def trunc_layer_coords(layers: Sequence[int]) -> list[int]:
    """The ``trunc_layer`` coordinate for truncation layers ``layers``: the baseline ``-1`` first."""
    return [-1] + [int(x) for x in layers if int(x) != -1]


@contextmanager
def zero_visual(layers: Sequence[Any], after: int, visual: "torch.Tensor") -> Iterator[None]:
    """Zero the visual positions of the states after every block with index > ``after``.

    They are zeroed where the next block reads them (its input), so what the model adds between
    blocks (DeepStack) is zeroed too; after the last block nothing reads visual positions.
    ``visual`` is the ``(B, S)`` (or ``(S,)``) mask of the prefill; decoding steps (other
    lengths) hold no visual tokens and pass unchanged.
    """
    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if hidden.shape[1] == visual.shape[-1]:
            hidden = hidden.clone()
            hidden[visual.expand(hidden.shape[0], -1).to(hidden.device)] = 0
        return (hidden, *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
               for k, layer in enumerate(layers) if k > after + 1]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def drop_visual(engine: Engine, after: int, visual: "torch.Tensor") -> Iterator[None]:
    """Remove the visual tokens (``(S,)`` mask of a batch-1 prefill) before block ``after + 1``.

    Blocks ``> after`` get the shortened hidden states and keyword arguments sliced to the kept
    positions (mask rows and columns, position embeddings, position ids), so their KV cache holds
    only the kept tokens; in cached decoding the mask's key columns are sliced the same way.
    DeepStack features meant for dropped positions are not added.
    """
    import torch

    seq = int(visual.shape[0])
    keep = ~visual

    def key_keep(n_keys: int, device: Any) -> "torch.Tensor":
        extra = torch.ones(max(n_keys - seq, 0), dtype=torch.bool)
        return torch.cat([keep, extra])[:n_keys].to(device)

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if hidden.shape[1] == seq:
            hidden = hidden[:, keep.to(hidden.device)]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.shape[-2] == seq:
                mask = mask[..., keep.to(mask.device), :]
            kwargs["attention_mask"] = mask[..., key_keep(mask.shape[-1], mask.device)]
        pe = kwargs.get("position_embeddings")
        if pe is not None and pe[0].shape[-2] == seq:
            kwargs["position_embeddings"] = tuple(t[..., keep.to(t.device), :] for t in pe)
        pid = kwargs.get("position_ids")
        if pid is not None and pid.shape[-1] == seq:
            kwargs["position_ids"] = pid[..., keep.to(pid.device)]
        return (hidden, *args[1:]), kwargs

    original = getattr(engine.text_model, "_deepstack_process", None)

    def deepstack(hidden: "torch.Tensor", where: "torch.Tensor", feats: "torch.Tensor") -> "torch.Tensor":
        # After the drop the visual positions are gone, and with them DeepStack's targets.
        return hidden if hidden.shape[1] != where.shape[-1] else original(hidden, where, feats)

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
               for k, layer in enumerate(engine.layers) if k > after]
    has_deepstack = original is not None
    if has_deepstack:
        engine.text_model._deepstack_process = deepstack
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if has_deepstack:
            del engine.text_model._deepstack_process  # back to the class's method


def truncated(engine: Engine, mode: str, after: int, visual: "torch.Tensor") -> ContextManager[None]:
    """The hooks of ``mode`` after block ``after`` for a batch-1 forward (``-1``: none)."""
    from capture.attention import check_attention_implementation, knockout

    if after < 0 or not bool(visual.any()):
        return nullcontext()
    if mode == "zero":
        return zero_visual(engine.layers, after, visual[None])
    if mode == "knockout":
        check_attention_implementation(engine.loaded.model)
        return knockout(engine.layers, after, visual[None])
    if mode == "drop":
        return drop_visual(engine, after, visual)
    raise ValueError(f"unknown truncation mode {mode!r}; choose from {', '.join(MODES)}")


def generate_text(engine: Engine, prompt: "PromptSample", mode: str, after: int, max_new_tokens: int) -> str:
    """Greedy answer of ``prompt`` (no answer appended) under ``mode`` after block ``after``."""
    import torch

    loaded = engine.loaded
    keys = loaded.adapter.forward_keys()
    device = loaded.input_device
    inputs = {k: v.to(device) for k, v in prompt.inputs.items() if k in keys}
    tok = loaded.processor.tokenizer
    visual = torch.as_tensor(prompt.is_visual)
    with torch.no_grad(), truncated(engine, mode, after, visual):
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=loaded.pad_token_id)
    return tok.decode(out[0, prompt.n_tokens:], skip_special_tokens=True).strip()


def truncation_sample(loaded: "LoadedModel", sample: "PromptSample", *, modes: Sequence[str],
                   layers: Sequence[int], score: Sequence[str] = ("logprob",), max_new_tokens: int = 16,
                   batch_size: int = 16, envoy: Any = None) -> InterventionResult:
    """Truncation of one sample: answer log-prob (and greedy text) per truncation layer and mode.

    Parameters
    ----------
    loaded
        The model (attention ``eager`` or ``sdpa`` for ``knockout``).
    sample
        The sample with its gold answer appended (:func:`capture.prompts.encode_sample`).
    modes
        The run's ``mode`` coordinate (``zero``, ``knockout``, ``drop``).
    layers
        Truncation layers ``L`` (visual tokens removed after block ``L``); the ``trunc_layer``
        coordinate is :func:`trunc_layer_coords` of them.
    score
        ``logprob`` (teacher-forced ``trunc_logp``) and/or ``generate`` (``trunc_text``).
    max_new_tokens
        Greedy generation length.
    batch_size
        Truncation layers per forward (teacher forcing).
    envoy
        An ``nnsight.NNsight`` wrapper of the model to reuse.

    Returns
    -------
    InterventionResult
        ``trunc_logp`` (float64) and, with ``generate``, ``trunc_text`` (object array of str),
        both ``(1 + len(layers), len(modes))``; failures are NaN / empty and listed in ``error``.

    Examples
    --------
    >>> import tempfile
    >>> from schemas.config import ModelConfig
    >>> from capture.tiny import build_tiny
    >>> from capture.family import load_model
    >>> from capture.prompts import encode_sample
    >>> loaded = load_model(ModelConfig(path=str(build_tiny("llava", tempfile.mkdtemp(), n_layers=2)),
    ...                                 dtype="float32", attn_implementation="sdpa"))
    >>> s = encode_sample(loaded.processor, loaded.image_token_id,
    ...                   {"index": 0, "sample_id": "x/0", "image": None, "question": "what ?", "answer": "red"})
    >>> truncation_sample(loaded, s, modes=["knockout"], layers=[0]).values["trunc_logp"].shape
    (2, 1)
    """
    import torch

    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown truncation mode {m!r}; choose from {', '.join(MODES)}")
    coords = trunc_layer_coords(layers)
    cut = coords[1:]
    shape = (len(coords), len(modes))
    values: dict[str, Any] = {"trunc_logp": np.full(shape, np.nan)}
    if "generate" in score:
        values["trunc_text"] = np.full(shape, "", dtype=object)
    errors: list[str] = []
    sid = sample.meta.get("sample_id", "?")
    engine = Engine(loaded, envoy)
    if "logprob" in score:
        try:
            clean = engine.clean_pass(sample)
        except Exception as exc:  # noqa: BLE001 - reported on the sample
            return InterventionResult(values, f"truncation clean pass of {sid}: {one_line(exc)}")
        values["trunc_logp"][0, :] = clean.logp
        order = sorted(range(len(cut)), key=lambda j: cut[j])
        for m, mode in enumerate(modes):
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                joins = [cut[j] for j in chunk]
                try:
                    lp = engine.run_suffix(clean, joins, lambda r, joins=joins: clean.outputs[joins[r]], mode=mode)
                    values["trunc_logp"][[1 + j for j in chunk], m] = lp.numpy()
                except Exception as exc:  # noqa: BLE001 - one failed chunk must not abort the shard
                    errors.append(f"{mode} from layer {joins[0]}: {one_line(exc)}")
                    log.debug("truncation failed", exc_info=True)
                    if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                        torch.cuda.empty_cache()
    if "generate" in score:
        prompt = with_answer(sample, [])
        try:
            base = generate_text(engine, prompt, modes[0] if modes else "zero", -1, max_new_tokens)
            values["trunc_text"][0, :] = base
        except Exception as exc:  # noqa: BLE001
            errors.append(f"generate: {one_line(exc)}")
        for m, mode in enumerate(modes):
            for i, after in enumerate(cut):
                try:
                    values["trunc_text"][1 + i, m] = generate_text(engine, prompt, mode, after, max_new_tokens)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"generate {mode} after {after}: {one_line(exc)}")
    return InterventionResult(values, summarize_errors(f"truncation {sid}", errors))


def run_truncation(loaded: "LoadedModel", batch: "Batch", cfg: "TruncationConfig", *,
                   coords: dict[str, list[Any]], envoy: Any = None) -> list[dict[str, Any]]:
    """Truncation of every sample of a runner batch (the runner's intervention hook).

    Each sample runs on its own, unpadded, with its own clean pass as the baseline, so baseline
    and truncated scores are the same computation.

    Parameters
    ----------
    loaded
        The model.
    batch
        The runner's :class:`capture.prompts.Batch` (its ``samples`` are used, each unpadded).
    cfg
        ``capture.truncation`` (``score``, ``max_new_tokens``).
    coords
        The run's coords: ``trunc_layer`` (baseline ``-1`` first) and ``mode``.
    envoy
        The runner's ``nnsight.NNsight`` wrapper of the model.

    Returns
    -------
    list of dict
        One per sample: ``trunc_logp`` (and ``trunc_text``) shaped ``(len(trunc_layer),
        len(mode))``, plus ``error`` when something failed.
    """
    layers = [x for x in coords["trunc_layer"] if x != -1]
    out = []
    for sample in batch.samples:
        res = truncation_sample(loaded, sample, modes=coords["mode"], layers=layers, score=cfg.score,
                                max_new_tokens=cfg.max_new_tokens, envoy=envoy)
        out.append({**res.values, **({"error": res.error} if res.error else {})})
    return out
