"""Causal tracing: patch one channel's hidden states at one decoder layer, re-score the answer.

For a sample, variant ``(layer l, method, channel)`` replaces the hidden states after decoder
block ``l`` at the channel's token positions (``visual``: the image tokens; ``text``: the question
tokens) and scores the gold answer by teacher forcing (:mod:`capture.scoring`);
``delta = logp_clean - logp_patched``. "After block ``l``" is what block ``l + 1`` reads: block
``l``'s output plus what the model adds to it there (Qwen3-VL's DeepStack vision features after
its first blocks), so a ``zero`` patch is zero where the next block reads it, not re-filled with
vision features. Methods (RESEARCH.md section 1):

- ``zero``: the states become 0;
- ``gaussian``: ``N(0, sigma^2)`` noise is added, ``sigma`` the standard deviation (population,
  over every element) of the clean channel states at that layer and sample; the draw is seeded
  by :func:`noise_seed` and made on the CPU, so it is the same on every device and batching;
- ``mean``: every token becomes the channel's mean state at that layer;
- ``swap``: the donor sample's channel states at the same layer, linearly resampled along the
  token order when the counts differ (:func:`resample_tokens`); the donor's answer is also
  scored on the recipient's prompt, clean and patched (does the output follow the donor?).

Every patch value depends only on clean states, so two exact speed-ups apply (``prefix=True``):
the clean pass (one nnsight trace) keeps every block's output, the keyword arguments the blocks
receive (attention mask, position embeddings) and the DeepStack injections; a variant patched at
layer ``l`` then starts from the cached state after block ``l`` and only blocks ``l + 1 ...`` run,
directly. Variants of one sample share a forward as batch rows sorted by layer; at block ``k``
only the rows whose patch layer is below ``k`` are computed (the others are still clean), so an
all-layer sweep costs about half the layer evaluations of full forwards, batched. Positions before
the channel's first token cannot change either (causal attention): they are not recomputed, the
blocks attend over their clean keys and values (recorded in the clean pass), which makes text-
channel sweeps (question after the image) nearly free. With
``prefix=False`` each chunk of variants is one full forward through nnsight with row ``j``
patched at its layer, in execution order. Tests prove both equal an independent hook
implementation. The same machinery drives :mod:`capture.truncation`.

Examples
--------
>>> import tempfile
>>> from schemas.config import ModelConfig
>>> from capture.tiny import build_tiny
>>> from capture.family import load_model
>>> from capture.prompts import encode_sample
>>> loaded = load_model(ModelConfig(path=str(build_tiny("llava", tempfile.mkdtemp(), n_layers=2)),
...                                 dtype="float32"))
>>> s = encode_sample(loaded.processor, loaded.image_token_id,
...                   {"index": 0, "sample_id": "x/0", "image": None, "question": "what colour ?", "answer": "red"})
>>> res = causal_sample(loaded, s, methods=["zero"], channels=["text"], layers=[0, 1])
>>> res.values["delta"].shape, res.error
((2, 1, 1), '')
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from schemas.errors import one_line

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from capture.family import LoadedModel
    from capture.prompts import Batch, PromptSample
    from schemas.config import CausalConfig

log = logging.getLogger(__name__)

METHODS = ("zero", "gaussian", "mean", "swap")
CHANNELS = ("visual", "text")
# Processor outputs that are per image, not per token (concatenated along dim 0 in a batch).
_STACKED_PREFIXES = ("pixel_values", "image_grid_thw", "video_grid_thw", "image_sizes")


@dataclass
class InterventionResult:
    """What an intervention run hands to the runner for one sample.

    ``values`` maps schema variable names to arrays shaped by their non-sample dims (order of
    the run's coords); ``error`` is empty, or one line describing the variants that failed (their
    values are NaN) -- the runner then marks the sample with it instead of aborting.
    """

    values: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class CleanState:
    """The clean forward of one sample, as the suffix runs need it.

    ``outputs[l]`` is the state after block ``l`` ``(S, D)``, what block ``l + 1`` reads: its
    output plus the DeepStack injection after it (Qwen3-VL); ``layer_kwargs`` the keyword
    arguments every block received; ``injections[l]`` the ``(visual mask (S,), features
    (n_visual, D))`` added after block ``l`` (Qwen3-VL DeepStack);
    ``positions`` / ``targets`` the predicting positions and the answer ids they predict;
    ``kv[l]`` block ``l``'s attention keys and values (what its cache would hold) and
    ``cache_key`` the name of the blocks' cache argument (None: keys not recorded).
    """

    outputs: list["torch.Tensor"]
    layer_kwargs: dict[str, Any]
    injections: dict[int, tuple["torch.Tensor", "torch.Tensor"]]
    positions: "torch.Tensor"
    targets: "torch.Tensor"
    is_visual: "torch.Tensor"
    is_text: "torch.Tensor"
    logp: float = float("nan")
    kv: dict[int, tuple["torch.Tensor", "torch.Tensor"]] = field(default_factory=dict)
    cache_key: str | None = None


class _KVRecorder:
    """Stands in for a KV cache in the clean pass: keeps each block's keys and values.

    Attention modules call ``cache.update(keys, values, layer_idx, ...)`` and attend over what it
    returns; returning the inputs unchanged leaves the forward exactly as without a cache.
    """

    def __init__(self) -> None:
        self.kv: dict[int, tuple["torch.Tensor", "torch.Tensor"]] = {}

    def update(self, keys: "torch.Tensor", values: "torch.Tensor", layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        self.kv[layer_idx] = (keys, values)
        return keys, values


class _CleanPrefixKV:
    """A KV cache holding the clean keys and values of positions ``< start`` for ``rows`` rows.

    A patch at positions ``>= start`` cannot change anything before ``start`` (causal attention),
    so those positions are not recomputed: every block attends over the clean prefix followed by
    the rows' own keys and values.
    """

    def __init__(self, kv: dict[int, tuple["torch.Tensor", "torch.Tensor"]], start: int) -> None:
        self.kv, self.start = kv, start

    def update(self, keys: "torch.Tensor", values: "torch.Tensor", layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        ck, cv = self.kv[layer_idx]
        n = keys.shape[0]
        pk = ck[..., :self.start, :].to(keys.device).expand(n, -1, -1, -1)
        pv = cv[..., :self.start, :].to(values.device).expand(n, -1, -1, -1)
        return torch.cat([pk, keys], dim=-2), torch.cat([pv, values], dim=-2)


def noise_seed(seed: int, sample_index: int, layer: int, channel: str) -> int:
    """Seed of the ``gaussian`` draw for one sample, layer and channel.

    ``np.random.SeedSequence([seed, sample_index, layer, CHANNELS.index(channel)])``'s first
    64-bit state word, masked to 63 bits; the draw is ``torch.randn(n_tokens, hidden,
    generator=torch.Generator().manual_seed(s))`` in float32 on the CPU.

    >>> noise_seed(0, 3, 5, "visual") == noise_seed(0, 3, 5, "visual") != noise_seed(0, 3, 5, "text")
    True
    """
    state = np.random.SeedSequence([seed, sample_index, layer, CHANNELS.index(channel)])
    return int(state.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def resample_tokens(states: "torch.Tensor", n: int) -> "torch.Tensor":
    """Linearly resample ``(m, D)`` token states to ``(n, D)`` along the token order.

    End points map to end points (``align_corners``); equal counts return ``states`` as is.

    >>> import torch
    >>> resample_tokens(torch.tensor([[0.0], [2.0]]), 3)[:, 0].tolist()
    [0.0, 1.0, 2.0]
    """
    import torch

    if states.shape[0] == n:
        return states
    if states.shape[0] == 1:
        return states.expand(n, -1)
    out = torch.nn.functional.interpolate(states.T[None].float(), size=n, mode="linear", align_corners=True)
    return out[0].T.to(states.dtype)


MAX_DONOR_TRIES = 4  # candidates tried when a donor row cannot be read or encoded


def pick_donor(index: int, n_items: int, seed: int = 0) -> int | None:
    """The swap donor of selection row ``index``: another row, fixed by ``(seed, index)``.

    Deterministic, so a resumed shard picks the same donors; ``None`` when there is no other row.

    >>> pick_donor(4, 10) != 4, pick_donor(0, 1)
    (True, None)
    """
    rows = donor_rows(index, n_items, seed, tries=1)
    return rows[0] if rows else None


def donor_rows(index: int, n_items: int, seed: int = 0, tries: int = MAX_DONOR_TRIES) -> list[int]:
    """Up to ``tries`` distinct swap donor candidates of row ``index``, first :func:`pick_donor`'s.

    The next candidates stand in when a donor row is unreadable; all are fixed by ``(seed, index)``.

    >>> rows = donor_rows(4, 10, tries=3)
    >>> len(set(rows)) == 3 and 4 not in rows and rows[0] == pick_donor(4, 10), donor_rows(0, 1)
    (True, [])
    """
    rng = np.random.default_rng([seed, index])
    out: list[int] = []
    for _ in range(8 * tries):  # draws with repeats: a few more than tries find distinct rows
        if len(out) == min(tries, n_items - 1):
            break
        other = int(rng.integers(n_items - 1))
        row = other + 1 if other >= index else other
        if row not in out:
            out.append(row)
    return out


def same_image(a: "PromptSample", b: "PromptSample") -> bool:
    """Whether two encoded samples show the same image (equal pixel inputs).

    A swap donor showing the recipient's image (VQAv2, DocVQA and ChartQA ask several questions
    of one image) would swap visual states for identical ones: a visual delta of exactly 0 that
    says nothing.

    >>> import torch
    >>> from capture.prompts import PromptSample
    >>> def enc(pixels):
    ...     z = np.zeros(1, bool)
    ...     return PromptSample({"pixel_values": torch.tensor(pixels)}, z, z, z, z, z, z, "")
    >>> same_image(enc([1.0, 2.0]), enc([1.0, 2.0])), same_image(enc([1.0, 2.0]), enc([1.0, 3.0]))
    (True, False)
    """
    pa, pb = a.inputs.get("pixel_values"), b.inputs.get("pixel_values")
    return pa is not None and pb is not None and pa.shape == pb.shape and bool((pa == pb).all())


def with_answer(sample: "PromptSample", answer_ids: Sequence[int]) -> "PromptSample":
    """``sample``'s prompt followed by other answer tokens (e.g. the swap donor's answer).

    Mirrors :func:`capture.prompts.encode_sample`'s answer appending at the token level:
    per-token inputs are cut at the prompt and extended (attention 1, other per-token inputs 0).
    An empty ``answer_ids`` gives the prompt alone (for generation).
    """
    import torch

    n_prompt = int(np.flatnonzero(sample.is_answer)[0]) if sample.is_answer.any() else sample.n_tokens
    extra = torch.tensor([list(answer_ids)], dtype=torch.long)
    inputs: dict[str, Any] = {}
    for key, value in sample.inputs.items():
        per_token = (not key.startswith(_STACKED_PREFIXES) and hasattr(value, "ndim") and value.ndim == 2
                     and value.shape == (1, sample.n_tokens))
        if not per_token:
            inputs[key] = value
            continue
        fill = extra if key == "input_ids" else torch.full_like(extra, 1 if key == "attention_mask" else 0)
        inputs[key] = torch.cat([value[:, :n_prompt], fill.to(value.dtype)], dim=1)
    ids = np.concatenate([sample.input_ids[:n_prompt], np.asarray(answer_ids, np.int32)])
    n_answer = len(answer_ids)
    no = np.zeros(n_answer, bool)
    return replace(sample, inputs=inputs, input_ids=ids,
                   is_visual=np.concatenate([sample.is_visual[:n_prompt], no]),
                   is_text=np.concatenate([sample.is_text[:n_prompt], no]),
                   is_answer=np.concatenate([np.zeros(n_prompt, bool), ~no]),
                   position=np.arange(n_prompt + n_answer, dtype=np.int32),
                   answer_ids=np.asarray(answer_ids, np.int32))


def summarize_errors(what: str, errors: Sequence[str]) -> str:
    """One line for a sample's failed variants: the first three and a count of the rest.

    >>> summarize_errors("causal t/1", ["a", "b", "c", "d"])
    'causal t/1: a; b; c; and 1 more'
    """
    if not errors:
        return ""
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return f"{what}: " + "; ".join(errors[:3]) + more


_ENVOYS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _envoy(model: Any) -> Any:
    # Wrapping walks every module; do it once per model.
    if model not in _ENVOYS:
        import nnsight

        _ENVOYS[model] = nnsight.NNsight(model)
    return _ENVOYS[model]


def repeat_inputs(inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """A batch of ``n`` copies of one sample's model inputs (image tensors concatenated)."""
    import torch

    out = {}
    for key, value in inputs.items():
        if not hasattr(value, "shape"):
            out[key] = value
        elif key.startswith(_STACKED_PREFIXES):
            out[key] = torch.cat([value] * n, dim=0)
        else:
            out[key] = value.expand(n, *value.shape[1:]).contiguous()
    return out


class Engine:
    """Clean passes, suffix runs from cached block outputs, and patched full forwards.

    Parameters
    ----------
    loaded
        The model (:class:`capture.family.LoadedModel`).
    envoy
        An ``nnsight.NNsight`` wrapper of ``loaded.model`` (made and cached when None).
    """

    def __init__(self, loaded: "LoadedModel", envoy: Any = None) -> None:
        self.loaded = loaded
        self.layers = loaded.layers()
        self.n_layers = len(self.layers)
        self.norm = loaded.final_norm()
        self.head = loaded.model.get_output_embeddings()
        text_path = loaded.adapter.layers_path.rsplit(".", 1)[0]
        self.text_model = loaded.adapter.resolve(loaded.model, text_path)
        self.envoy = envoy if envoy is not None else _envoy(loaded.model)
        self._text_envoy = loaded.adapter.resolve(self.envoy, text_path)
        self._norm_envoy = loaded.adapter.resolve(self.envoy, loaded.adapter.final_norm_path)

    # -- clean pass ---------------------------------------------------------------------------
    def forward_inputs(self, sample: "PromptSample") -> dict[str, Any]:
        """The model inputs of ``sample`` on the input device."""
        device = self.loaded.input_device
        return {k: v.to(device) if hasattr(v, "to") else v
                for k, v in self.loaded.forward_inputs(sample.inputs).items()}

    def clean_pass(self, sample: "PromptSample") -> CleanState:
        """One nnsight trace of the unpatched sample keeping what the suffix runs need."""
        import nnsight
        import torch

        from capture.scoring import predicting_positions

        is_answer = torch.as_tensor(sample.is_answer)
        _, positions = predicting_positions(is_answer)
        if positions.numel() == 0:  # a sum over no tokens would score 0, a certain answer
            raise ValueError("no answer tokens to score (the answer is empty)")
        targets = torch.as_tensor(sample.input_ids, dtype=torch.long)[positions + 1]
        recorder = _KVRecorder()

        def record_kv(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            # transformers 5.x names the cache argument `cache` (earlier: `past_key_values`).
            for name in ("cache", "past_key_values"):
                if name in kwargs:
                    return args, {**kwargs, name: recorder}
            return args, kwargs

        handles = [layer.register_forward_pre_hook(record_kv, with_kwargs=True) for layer in self.layers]
        try:
            with torch.no_grad(), self.envoy.trace(**self.forward_inputs(sample), use_cache=False,
                                                    logits_to_keep=1):
                # Names bound inside a trace do not escape it unless saved, so save unconditionally.
                text_inputs = self._text_envoy.inputs.save()
                block_inputs = self.loaded.layer_envoys(self.envoy)[0].inputs.save()
                outputs = nnsight.save([])
                for block in self.loaded.layer_envoys(self.envoy):
                    outputs.append(block.output[0])
        finally:
            for h in handles:
                h.remove()
        kwargs = dict(block_inputs[1])
        cache_key = next((k for k in ("cache", "past_key_values") if k in kwargs), None)
        if cache_key is not None:
            kwargs[cache_key] = None
        kwargs["use_cache"] = False
        complete = len(recorder.kv) == self.n_layers and cache_key is not None
        injections = {}
        feats = text_inputs[1].get("deepstack_visual_embeds")  # Qwen3-VL DeepStack features
        if feats is not None:
            where = text_inputs[1]["visual_pos_masks"][0]
            injections = {k: (where, f) for k, f in enumerate(feats)}
        clean = CleanState(list(outputs), kwargs, injections, positions, targets,
                           torch.as_tensor(sample.is_visual), torch.as_tensor(sample.is_text),
                           kv=recorder.kv if complete else {}, cache_key=cache_key if complete else None)
        clean.outputs = [self.inject(k, h[None], clean)[0] for k, h in enumerate(clean.outputs)]
        clean.logp = float(self.score(clean.outputs[-1][None], clean)[0])
        return clean

    # -- pieces shared by both paths ------------------------------------------------------------
    def score(self, final: "torch.Tensor", clean: CleanState,
              positions: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Summed answer log-prob per row of final block outputs ``(n, S, D)`` (float64, CPU)."""
        import torch

        from capture.scoring import gathered_logprobs

        pos = clean.positions if positions is None else positions
        with torch.no_grad():
            h = final[:, pos.to(final.device)]
            h = self.norm(h.to(self.norm.weight.device))
            logits = self.head(h.to(self.head.weight.device))
            n, p, v = logits.shape
            lp = gathered_logprobs(logits.reshape(n * p, v), clean.targets.repeat(n))
        return lp.reshape(n, p).sum(1).cpu()

    def inject(self, layer: int, h: "torch.Tensor", clean: CleanState, start: int = 0) -> "torch.Tensor":
        """Add what the model adds after block ``layer`` (DeepStack) to every row of ``h``.

        ``h`` holds positions ``start ...`` of the sequence.
        """
        if layer not in clean.injections:
            return h
        where, feats = clean.injections[layer]
        skipped = int(where[:start].sum())  # features of visual tokens before `start`
        where, feats = where[start:], feats[skipped:]
        n = h.shape[0]
        return self.text_model._deepstack_process(h, where[None].expand(n, -1), feats.repeat(n, 1))

    # -- the suffix path -----------------------------------------------------------------------
    def run_suffix(self, clean: CleanState, joins: Sequence[int], states: Callable[[int], "torch.Tensor"],
                   mode: str | None = None, start: int = 0) -> "torch.Tensor":
        """Score rows that leave the clean run after block ``joins[j]`` with state ``states(j)``
        (what block ``joins[j] + 1`` reads, as :attr:`CleanState.outputs`).

        Parameters
        ----------
        clean
            The sample's :class:`CleanState`.
        joins
            Per row, the block whose (edited) output the row starts from, in ascending order.
        states
            ``states(j)``: row ``j``'s ``(S, D)`` state after block ``joins[j]`` (called when
            the row joins, so only one chunk of patch values is alive at a time).
        mode
            Visual truncation applied in the blocks after each row's join: None, ``zero``
            (visual states set to 0 after each block, DeepStack's additions included),
            ``knockout`` (no query attends to visual keys) or ``drop`` (visual tokens removed,
            original positions kept).
        start
            No row differs from the clean run before this position. With ``mode=None``,
            recorded clean keys and an attention that takes 4-D masks (eager, sdpa), positions
            ``< start`` are not recomputed: the blocks attend over their clean keys and values
            instead.

        Returns
        -------
        torch.Tensor
            ``(len(joins),)`` float64 answer log-probs.
        """
        import torch

        from capture.attention import (MASKED_ATTENTION, attention_implementation, block_keys,
                                       check_attention_implementation)

        if list(joins) != sorted(joins):
            raise ValueError("joins must be in ascending order")
        if mode == "knockout":
            check_attention_implementation(self.loaded.model)
        # the clean-prefix shortcut hands the blocks a 4-D mask, which flash attention would misread
        masks = attention_implementation(self.loaded.model) in MASKED_ATTENTION
        device = clean.outputs[0].device  # masks built here must live with the model
        visual = clean.is_visual.to(device)
        seq = int(visual.shape[0])
        kwargs = dict(clean.layer_kwargs)
        positions = clean.positions
        keep = None
        if mode is not None or clean.cache_key is None or not masks or not 0 < start <= int(positions.min()):
            start = 0
        if start:
            kwargs = _slice_sequence(kwargs, torch.arange(seq) >= start, seq, keys=False)
            if kwargs.get("attention_mask") is None:  # sdpa's is_causal would align the corner wrongly
                kwargs["attention_mask"] = block_keys(None, torch.zeros(1, seq, dtype=torch.bool, device=device),
                                                      seq - start, n_keys=seq)
            kwargs[clean.cache_key] = _CleanPrefixKV(clean.kv, start)
            positions = positions - start
        elif mode == "drop" and bool(visual.any()):
            keep = ~visual
            if not bool(keep[positions.to(device)].all()):
                raise ValueError("a position that predicts an answer token is a visual token")
            kwargs = _slice_sequence(kwargs, keep, seq)
            positions = (torch.cumsum(keep.long(), 0) - 1)[positions.to(device)]
        elif mode == "knockout":
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = block_keys(mask, visual[None], seq)
        elif mode not in (None, "zero", "drop"):
            raise ValueError(f"unknown truncation mode {mode!r}")
        h = None
        row = 0
        with torch.no_grad():
            for k in range(joins[0] + 1, self.n_layers + 1):
                new = []
                while row < len(joins) and joins[row] == k - 1:
                    new.append(states(row)[start:])
                    row += 1
                if new:
                    x = torch.stack(new)
                    if keep is not None:
                        x = x[:, keep.to(x.device)]
                    h = x if h is None else torch.cat([h, x.to(h.device)])
                if k == self.n_layers:
                    break
                h = self.layers[k](h, **kwargs)
                if keep is None:
                    h = self.inject(k, h, clean, start)
                if mode == "zero":
                    h[:, visual.to(h.device)] = 0
            return self.score(h, clean, positions)

    # -- the full-forward path (nnsight) -------------------------------------------------------
    def run_patched(self, sample: "PromptSample", clean: CleanState, layers: Sequence[int],
                    index: "torch.Tensor", values: Sequence["torch.Tensor"]) -> "torch.Tensor":
        """One full forward, batch row ``j`` patched after block ``layers[j]``.

        ``index`` holds the patched token positions and ``values[j]`` row ``j``'s states there,
        written into what reads them: the next block's input, or the final norm's after the last
        block. The interventions are written in execution order (ascending layer), as nnsight
        requires.
        """
        import nnsight
        import torch

        n = len(layers)
        envoys = [*self.loaded.layer_envoys(self.envoy)[1:], self._norm_envoy]  # envoys[k] reads block k
        inputs = repeat_inputs(self.forward_inputs(sample), n)
        with torch.no_grad(), self.envoy.trace(**inputs, use_cache=False, logits_to_keep=1):
            for k in sorted(set(layers) | {self.n_layers - 1}):
                state = envoys[k].inputs[0][0]
                for j, layer in enumerate(layers):
                    if layer == k:
                        state[j, index.to(state.device)] = values[j].to(state.device, state.dtype)
            final = nnsight.save(state)  # the final norm's input
        return self.score(final, clean)


def _slice_sequence(kwargs: dict[str, Any], keep: "torch.Tensor", seq_len: int, keys: bool = True) -> dict[str, Any]:
    """Block keyword arguments restricted to the kept positions (mask queries, and keys if ``keys``)."""
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        k = keep.to(mask.device)
        out["attention_mask"] = mask[..., k, :][..., k] if keys else mask[..., k, :]
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(t[..., keep.to(t.device), :] for t in pe)
    pid = kwargs.get("position_ids")
    if pid is not None and pid.shape[-1] == seq_len:
        out["position_ids"] = pid[..., keep.to(pid.device)]
    return out


# -- causal tracing -------------------------------------------------------------------------------
def _channel_mask(clean: CleanState, channel: str) -> "torch.Tensor":
    return clean.is_visual if channel == "visual" else clean.is_text


def _channel_index(clean: CleanState, channel: str) -> "torch.Tensor":
    import torch

    return torch.nonzero(_channel_mask(clean, channel), as_tuple=True)[0]


def patch_value(clean: CleanState, layer: int, method: str, channel: str, *, seed: int = 0,
                sample_index: int = 0, donor: CleanState | None = None) -> "torch.Tensor":
    """The states a variant writes at the channel's positions after block ``layer``.

    Returns
    -------
    torch.Tensor
        ``(n_channel_tokens, D)`` in the model's dtype, on the output's device.
    """
    import torch

    idx = _channel_index(clean, channel)
    x = clean.outputs[layer][idx.to(clean.outputs[layer].device)]
    if method == "zero":
        return torch.zeros_like(x)
    if method == "mean":
        return x.float().mean(0, keepdim=True).expand_as(x).to(x.dtype)
    if method == "gaussian":
        sigma = x.float().std(correction=0)
        gen = torch.Generator().manual_seed(noise_seed(seed, sample_index, layer, channel))
        noise = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float32)
        return (x.float() + sigma * noise.to(x.device)).to(x.dtype)
    if method == "swap":
        if donor is None:
            raise ValueError("swap needs a donor")
        didx = _channel_index(donor, channel)
        if len(didx) == 0:
            raise ValueError(f"the swap donor has no {channel} tokens")
        src = donor.outputs[layer][didx.to(donor.outputs[layer].device)]
        return resample_tokens(src, x.shape[0]).to(x.device, x.dtype)
    raise ValueError(f"unknown causal method {method!r}")


def _sweep(engine: Engine, sample: "PromptSample", clean: CleanState, variants: list[tuple[int, str, str]],
           *, seed: int, donor: CleanState | None, batch_size: int, prefix: bool,
           errors: list[str]) -> np.ndarray:
    """Answer log-prob of each variant (NaN where it failed; the failure goes to ``errors``)."""
    import torch

    index = int(sample.meta.get("index") or 0)
    out = np.full(len(variants), np.nan)
    order = sorted(range(len(variants)), key=lambda j: variants[j][0])

    def value(j: int) -> "torch.Tensor":
        layer, method, channel = variants[j]
        return patch_value(clean, layer, method, channel, seed=seed, sample_index=index, donor=donor)

    def run(chunk: list[int]) -> None:
        try:
            if prefix:
                def state(r: int) -> "torch.Tensor":
                    j = chunk[r]
                    s = clean.outputs[variants[j][0]].clone()
                    idx = _channel_index(clean, variants[j][2]).to(s.device)
                    s[idx] = value(j)
                    return s
                first = int(_channel_index(clean, variants[chunk[0]][2])[0])
                lp = engine.run_suffix(clean, [variants[j][0] for j in chunk], state, start=first)
            else:
                channels = {variants[j][2] for j in chunk}
                if len(channels) != 1:
                    raise ValueError("a patched forward takes one channel")
                lp = engine.run_patched(sample, clean, [variants[j][0] for j in chunk],
                                        _channel_index(clean, channels.pop()), [value(j) for j in chunk])
            out[chunk] = lp.numpy()
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                errors.append(f"layer {variants[chunk[0]][0]} {variants[chunk[0]][1]} "
                              f"{variants[chunk[0]][2]}: out of memory")
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            run(chunk[:half])
            run(chunk[half:])
        except Exception as exc:  # noqa: BLE001 - one failed chunk must not abort the shard
            first = variants[chunk[0]]
            errors.append(f"{len(chunk)} variant(s) from layer {first[0]} {first[1]} {first[2]}: {one_line(exc)}")
            log.debug("causal variants failed", exc_info=True)

    # One channel per chunk: a patched forward writes one index set, a suffix run skips the
    # positions before the channel's first token.
    groups = [[j for j in order if variants[j][2] == c] for c in CHANNELS]
    for group in groups:
        for start in range(0, len(group), batch_size):
            run(group[start:start + batch_size])
    return out


def causal_sample(loaded: "LoadedModel", sample: "PromptSample", *, methods: Sequence[str],
               channels: Sequence[str], layers: Sequence[int], seed: int = 0, batch_size: int = 16,
               donor: "PromptSample | None" = None, prefix: bool = True, envoy: Any = None) -> InterventionResult:
    """Causal tracing of one sample: every ``layer x method x channel`` variant.

    Parameters
    ----------
    loaded
        The model.
    sample
        The sample with its gold answer appended (:func:`capture.prompts.encode_sample`).
    methods, channels, layers
        The run's ``method``, ``channel`` and ``layer`` coordinates (in that order).
    seed
        Seed of the ``gaussian`` draws (see :func:`noise_seed`).
    batch_size
        Variants per forward.
    donor
        The swap donor, encoded with its own answer (see :func:`pick_donor`); without one the
        ``swap`` variants are NaN (``swap_donor`` empty).
    prefix
        Start each variant from the cached clean block output (default) instead of a full
        forward; both give the same numbers.
    envoy
        An ``nnsight.NNsight`` wrapper of the model to reuse.

    Returns
    -------
    InterventionResult
        ``values``: ``logp_clean`` (float), ``logp_patched`` and ``delta``
        ``(len(layers), len(methods), len(channels))``; with ``swap`` also ``swap_donor``,
        ``donor_logp_clean`` and ``donor_logp_patched`` ``(len(layers), len(channels))``.
        Variants of a channel the sample lacks (no image), and swaps of a channel its donor
        lacks, are NaN without an error; failed variants are NaN and listed in ``error``.

    Examples
    --------
    See the module docstring.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown causal method {m!r}; choose from {', '.join(METHODS)}")
    for c in channels:
        if c not in CHANNELS:
            raise ValueError(f"unknown channel {c!r}; choose from {', '.join(CHANNELS)}")
    engine = Engine(loaded, envoy)
    shape = (len(layers), len(methods), len(channels))
    values: dict[str, Any] = {"logp_clean": float("nan"), "logp_patched": np.full(shape, np.nan),
                              "delta": np.full(shape, np.nan)}
    errors: list[str] = []
    sid = sample.meta.get("sample_id", "?")
    try:
        clean = engine.clean_pass(sample)
    except Exception as exc:  # noqa: BLE001 - reported on the sample
        return InterventionResult(values, f"causal clean pass of {sid}: {one_line(exc)}")
    values["logp_clean"] = clean.logp
    present = {c: bool(_channel_mask(clean, c).any()) for c in channels}
    donor_clean = alt_clean = None
    if "swap" in methods:
        values.update(swap_donor="", donor_logp_clean=float("nan"),
                      donor_logp_patched=np.full((len(layers), len(channels)), np.nan))
        if donor is not None:  # none (a one-sample selection, unreadable donors): swap stays NaN
            try:
                values["swap_donor"] = str(donor.meta.get("sample_id", ""))
                donor_clean = engine.clean_pass(donor)
                alt = with_answer(sample, donor.answer_ids.tolist())
                alt_clean = engine.clean_pass(alt)
                values["donor_logp_clean"] = alt_clean.logp
            except Exception as exc:  # noqa: BLE001
                errors.append(f"swap donor {values['swap_donor']}: {one_line(exc)}")
                donor_clean = alt_clean = None
    # a channel the donor lacks (no image) has nothing to swap in: NaN, like one the sample lacks
    donor_has = {c: donor_clean is not None and bool(_channel_mask(donor_clean, c).any()) for c in channels}
    variants = [(layer, m, c) for layer in layers for m in methods for c in channels
                if present[c] and (m != "swap" or donor_has[c])]
    lp = _sweep(engine, sample, clean, variants, seed=seed, donor=donor_clean, batch_size=batch_size,
                prefix=prefix, errors=errors)
    pos = {(layer, m, c): (i, j, k) for i, layer in enumerate(layers) for j, m in enumerate(methods)
           for k, c in enumerate(channels)}
    for v, x in zip(variants, lp, strict=True):
        values["logp_patched"][pos[v]] = x
    values["delta"] = clean.logp - values["logp_patched"]
    if alt_clean is not None:
        swaps = [v for v in variants if v[1] == "swap"]
        dlp = _sweep(engine, alt, alt_clean, swaps, seed=seed, donor=donor_clean, batch_size=batch_size,
                     prefix=prefix, errors=errors)
        for (layer, _, c), x in zip(swaps, dlp, strict=True):
            values["donor_logp_patched"][list(layers).index(layer), list(channels).index(c)] = x
    return InterventionResult(values, summarize_errors(f"causal {sid}", errors))


def run_causal(loaded: "LoadedModel", batch: "Batch", cfg: "CausalConfig", *, coords: dict[str, list[Any]],
               donors: "Sequence[PromptSample | None] | None" = None, envoy: Any = None) -> list[dict[str, Any]]:
    """Causal tracing of every sample of a runner batch (the runner's intervention hook).

    Each sample runs on its own, unpadded: its clean pass and its patched runs are then the same
    computation, so ``delta`` is not polluted by padding numerics (visible in bfloat16); the
    runner's batched capture trace is not reused.

    Parameters
    ----------
    loaded
        The model.
    batch
        The runner's :class:`capture.prompts.Batch` (its ``samples`` are used).
    cfg
        ``capture.causal`` (``seed``, ``batch_size``: variants per forward).
    coords
        The run's coords: ``layer``, ``method``, ``channel`` give the variants and the order of
        the returned arrays.
    donors
        Per sample, its swap donor encoded with the donor's own answer (``pick_donor`` picks
        which dataset row); needed when ``swap`` is a method.
    envoy
        The runner's ``nnsight.NNsight`` wrapper of the model (one wrapper per model).

    Returns
    -------
    list of dict
        One per sample, in batch order: schema variable -> value (see :func:`causal_sample`),
        plus ``error`` (one line) when some variants failed; their values are NaN.
    """
    out = []
    for i, sample in enumerate(batch.samples):
        res = causal_sample(loaded, sample, methods=coords["method"], channels=coords["channel"],
                            layers=coords["layer"], seed=cfg.seed, batch_size=cfg.batch_size,
                            donor=donors[i] if donors is not None else None, envoy=envoy)
        out.append({**res.values, **({"error": res.error} if res.error else {})})
    return out
