"""Prompts, teacher-forced answers, per-sample token masks and batch collation.

Every prompt is rendered by ``processor.apply_chat_template`` (the checkpoint's own template);
nothing here knows a family. The gold answer's tokens are appended where the template puts an
assistant answer (after the generation prompt, and after a reasoning checkpoint's closed think
block: :func:`answer_lead`), so the answer token at sequence index ``i`` is predicted by the
logits at ``i - 1``.

Masks are computed per sample from that sample's own tokens:

- ``is_visual``: ``input_ids == image_token_id`` (dynamic resolution gives each sample its own
  count);
- ``is_text``: the question's tokens, found by character offsets of the question inside the
  rendered prompt;
- ``is_answer``: the appended answer tokens.

Examples
--------
>>> import tempfile
>>> from schemas.config import ModelConfig
>>> from capture.tiny import build_tiny
>>> from capture.family import load_model
>>> loaded = load_model(ModelConfig(path=str(build_tiny("llava", tempfile.mkdtemp(), n_layers=2)),
...                                 dtype="float32"))
>>> s = encode_sample(loaded.processor, loaded.image_token_id,
...                   {"index": 0, "sample_id": "x/0", "image": None, "question": "what colour ?",
...                    "answer": "red"})
>>> [loaded.processor.tokenizer.decode(int(t)) for t in s.input_ids[s.is_text]]
['what', 'colour', '?']
>>> loaded.processor.tokenizer.decode(int(s.input_ids[s.is_answer][0]))
'red'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.errors import GapError

# Processor outputs that are not per token: concatenated along dim 0 across samples.
_STACKED_PREFIXES = ("pixel_values", "image_grid_thw", "video_grid_thw", "image_sizes")

# The version of how a dataset sample becomes tokens (question text, template use, answer
# placement, masks). Stored with the run, so a resumed run cannot mix two ways of prompting:
# 2 put a reasoning template's answer after its closed think block (:func:`answer_lead`),
# 3 gave ScienceQA questions their hint as context. Bump it with any such change.
PROMPT_FORMAT = 3


@dataclass
class PromptSample:
    """One sample encoded for a forward pass (batch dimension 1 in ``inputs``).

    Attributes
    ----------
    inputs
        Processor outputs with the answer appended to every per-token tensor
        (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ...).
    input_ids, is_visual, is_text, is_answer, position
        Per-token arrays of length ``n_tokens`` (the sample's own tokens, no padding).
    answer_ids
        The teacher-forced answer token ids (``input_ids[is_answer]``).
    meta
        The dataset fields (index, sample_id, question, answer, answers, subset).
    """

    inputs: dict[str, Any]
    input_ids: np.ndarray
    is_visual: np.ndarray
    is_text: np.ndarray
    is_answer: np.ndarray
    position: np.ndarray
    answer_ids: np.ndarray
    prompt_text: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def answer_positions(self) -> np.ndarray:
        """Indices (in the sample's own sequence) of the answer tokens."""
        return np.flatnonzero(self.is_answer)


def prompt_identity(processor: Any) -> dict[str, Any]:
    """What fixes a run's prompts besides its config: :data:`PROMPT_FORMAT` and the checkpoint's
    chat template (a snapshot updated between two shards may bring another one).

    >>> from types import SimpleNamespace
    >>> prompt_identity(SimpleNamespace(chat_template="{{ messages }}"))["chat_template_sha256"][:12]
    'f24189f08c85'
    """
    template = getattr(processor, "chat_template", None)
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return {"prompt_format": PROMPT_FORMAT,
            "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest()}


def build_messages(question: str, has_image: bool) -> list[dict[str, Any]]:
    """The chat messages for one question (image first, as the model cards show).

    >>> build_messages("why?", True)[0]["content"][0]
    {'type': 'image'}
    """
    content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, question: str, has_image: bool) -> str:
    """The prompt text from the checkpoint's chat template, ending where its answer starts.

    That is the generation prompt, plus what the template itself writes before an assistant
    answer when that is more than whitespace (:func:`answer_lead`).
    """
    if getattr(processor, "chat_template", None) is None:
        raise GapError("the processor has no chat template; capture renders prompts only through "
                       "processor.apply_chat_template")
    messages = build_messages(question, has_image)
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + answer_lead(processor, messages, prompt)


ANSWER_MARK = "GAPANSWERMARK"  # the answer's stand-in in a rendering with the assistant turn


def answer_lead(processor: Any, messages: list[dict[str, Any]], prompt: str) -> str:
    """What the template writes between its generation prompt and an assistant answer.

    A reasoning checkpoint (Qwen3-VL-*-Thinking) ends its generation prompt inside an opened
    think block (``...assistant\n<think>\n``), and its own rendering of an answer closes the
    block first (``\n</think>\n\n``). Appending the gold answer right after the generation prompt
    would score it as the first words of the reasoning, and greedy generation would reason
    instead of answering; after the lead both see the answer's place. A lead of whitespace only
    (LLaVA's ``ASSISTANT:`` + ``" "``) is left to the answer's own tokens, as generation sees it.
    A template that cannot render an assistant turn has no lead.

    >>> import tempfile
    >>> from transformers import AutoProcessor
    >>> from capture.tiny import build_tiny
    >>> proc = AutoProcessor.from_pretrained(build_tiny("qwen2_vl", tempfile.mkdtemp(), n_layers=1))
    >>> msgs = build_messages("why?", False)
    >>> answer_lead(proc, msgs, proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    ''
    """
    turn = {"role": "assistant", "content": [{"type": "text", "text": ANSWER_MARK}]}
    try:
        full = processor.apply_chat_template(messages + [turn], tokenize=False)
    except Exception:  # noqa: BLE001 - any template error: the template has no assistant turn to copy
        return ""
    head = full[:full.find(ANSWER_MARK)] if ANSWER_MARK in full else ""
    return head[len(prompt):] if head.startswith(prompt) and head[len(prompt):].strip() else ""


QUESTION_MARK = "GAPQUESTIONMARK"  # the question's stand-in in a second rendering of the template


def _question_span(processor: Any, prompt: str, question: str, has_image: bool, sample_id: str) -> tuple[int, int]:
    """Characters of ``prompt`` that are the question.

    Where the template puts the user's text is found by rendering it again with a marker in the
    question's place: the question's own text may also stand in a system prompt or in the
    template's words (a question "assistant", "a" or "USER").
    """
    if not question.strip():
        return 0, 0  # no question text: no text tokens
    candidates = (question, question.strip())
    marked = render_prompt(processor, QUESTION_MARK, has_image)
    start = marked.find(QUESTION_MARK)
    for candidate in candidates:
        if start >= 0 and prompt.startswith(candidate, start):
            return start, start + len(candidate)
    # a template that rewrites the user's text: its last occurrence (a system prompt comes earlier)
    for candidate in candidates:
        found = prompt.rfind(candidate)
        if found >= 0:
            return found, found + len(candidate)
    raise GapError(f"sample {sample_id}: the question text does not appear in the rendered chat prompt")


def _runs(ids: Sequence[int], image_id: int) -> list[tuple[int, int, int]]:
    """``(token, start, stop)`` with each run of image tokens collapsed into one entry."""
    out: list[tuple[int, int, int]] = []
    for k, t in enumerate(ids):
        if t == image_id and out and out[-1][0] == image_id and out[-1][2] == k:
            out[-1] = (t, out[-1][1], k + 1)
        else:
            out.append((t, k, k + 1))
    return out


def _align_expanded(short_ids: Sequence[int], long_ids: Sequence[int], image_id: int,
                    sample_id: str) -> np.ndarray:
    """For each token of the processor's output, the index of the prompt token it came from.

    The processor replaces each image placeholder by a run of image tokens; everything else
    must tokenize identically, which is checked here.
    """
    short, long = _runs(short_ids, image_id), _runs(long_ids, image_id)
    if [r[0] for r in short] != [r[0] for r in long]:
        raise GapError(f"sample {sample_id}: the processor's tokens do not match the prompt's tokens "
                       "outside the image placeholders")
    src = np.empty(len(long_ids), np.int64)
    for (_, s0, _), (_, l0, l1) in zip(short, long):
        src[l0:l1] = s0
    return src


def encode_sample(processor: Any, image_token_id: int, sample: dict[str, Any], *,
                  answer: str | None = None, append_answer: bool = True) -> PromptSample:
    """Encode one dataset sample: chat prompt, image, appended answer, masks.

    Parameters
    ----------
    processor
        The checkpoint's processor (``LoadedModel.processor``).
    image_token_id
        ``LoadedModel.image_token_id``.
    sample
        A dataset item: ``index``, ``sample_id``, ``image`` (PIL or None), ``question``,
        ``answer``, optionally ``answers`` and ``subset``.
    answer
        Teacher-forced text instead of ``sample["answer"]`` (e.g. a swap donor's answer).
    append_answer
        False for a prompt-only encoding (generation).

    Returns
    -------
    PromptSample

    Examples
    --------
    See the module docstring.
    """
    import torch

    sample_id = str(sample.get("sample_id", sample.get("index", "?")))
    question = str(sample.get("question", ""))
    image = sample.get("image")
    if image is not None:
        image = image.convert("RGB")  # palette / RGBA / greyscale images
    prompt = render_prompt(processor, question, image is not None)
    tok = processor.tokenizer
    # Same rule as ProcessorMixin.apply_chat_template: a template that writes BOS itself gets
    # no second one from the tokenizer.
    add_special = not (tok.bos_token is not None and prompt.startswith(tok.bos_token))
    kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt", "add_special_tokens": add_special}
    if image is not None:
        kwargs["images"] = [image]
    enc = dict(processor(**kwargs))
    ids = enc["input_ids"][0].tolist()

    # Question span: offsets of the unexpanded prompt, carried over to the expanded tokens.
    plain = tok(prompt, add_special_tokens=add_special, return_offsets_mapping=True)
    qs, qe = _question_span(processor, prompt, question, image is not None, sample_id)
    offsets = np.asarray(plain["offset_mapping"], np.int64).reshape(-1, 2)
    in_question = (offsets[:, 1] > qs) & (offsets[:, 0] < qe) & (offsets[:, 1] > offsets[:, 0])
    src = _align_expanded(plain["input_ids"], ids, image_token_id, sample_id)
    is_text_prompt = in_question[src] & (np.asarray(ids) != image_token_id)

    answer_text = str(sample.get("answer", "") if answer is None else answer)
    answer_ids: list[int] = []
    if append_answer and answer_text:
        answer_ids = tok(answer_text, add_special_tokens=False)["input_ids"]
    n_prompt, n_answer = len(ids), len(answer_ids)
    if n_answer:
        extra = torch.tensor([answer_ids], dtype=enc["input_ids"].dtype)
        seq_len = enc["input_ids"].shape[1]
        for key, value in list(enc.items()):
            if key == "input_ids":
                enc[key] = torch.cat([value, extra], dim=1)
            elif _is_token_tensor(key, value, seq_len):
                fill = 1 if key == "attention_mask" else 0
                enc[key] = torch.cat([value, torch.full((1, n_answer), fill, dtype=value.dtype)], dim=1)
    all_ids = np.asarray(ids + answer_ids, np.int32)
    n = n_prompt + n_answer
    is_answer = np.zeros(n, bool)
    is_answer[n_prompt:] = True
    meta = {k: sample.get(k) for k in ("index", "sample_id", "question", "answer", "answers", "subset")}
    meta["answer"] = answer_text
    return PromptSample(
        inputs=enc,
        input_ids=all_ids,
        is_visual=all_ids == image_token_id,
        is_text=np.concatenate([is_text_prompt, np.zeros(n_answer, bool)]),
        is_answer=is_answer,
        position=np.arange(n, dtype=np.int32),
        answer_ids=np.asarray(answer_ids, np.int32),
        prompt_text=prompt,
        meta=meta,
    )


def _is_token_tensor(key: str, value: Any, seq_len: int) -> bool:
    return (not key.startswith(_STACKED_PREFIXES) and hasattr(value, "shape")
            and value.ndim == 2 and value.shape[0] == 1 and value.shape[1] == seq_len)


@dataclass
class Batch:
    """Samples padded into one set of model inputs.

    ``inputs`` holds padded per-token tensors ``(B, T)`` and the concatenated image tensors.
    Sample ``i``'s own tokens are the columns ``offsets[i] : offsets[i] + lengths[i]`` of row
    ``i`` (right padding: offset 0; left padding: ``T - length``).
    """

    samples: list[PromptSample]
    inputs: dict[str, Any]
    offsets: list[int]
    lengths: list[int]
    padding_side: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def token_slice(self, i: int) -> slice:
        """Columns of row ``i`` that hold sample ``i``'s tokens."""
        return slice(self.offsets[i], self.offsets[i] + self.lengths[i])

    def to(self, device: Any, queued: bool = False) -> Batch:
        """A copy whose tensors live on ``device``; ``queued``: copied to a GPU without waiting
        for it (:func:`capture.transfer.host_to_device`)."""
        from capture.transfer import host_to_device

        move = host_to_device if queued else (lambda v, d: v.to(d))
        moved = {k: move(v, device) if hasattr(v, "to") else v for k, v in self.inputs.items()}
        return Batch(self.samples, moved, self.offsets, self.lengths, self.padding_side)


def collate(samples: Sequence[PromptSample], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad encoded samples into one batch (``padding_side`` ``right`` or ``left``).

    Per-token tensors are padded (``input_ids`` with ``pad_token_id``, everything else with 0,
    so padding is masked out); image tensors are concatenated in sample order, which is the
    order the models consume them in (zero-padded where their per-image shapes differ, as
    LLaVA-NeXT's tile counts do).

    Examples
    --------
    >>> import torch
    >>> def fake(n):
    ...     ids = np.arange(n, dtype=np.int32)
    ...     z = np.zeros(n, bool)
    ...     inputs = {"input_ids": torch.tensor(ids[None]), "attention_mask": torch.ones(1, n, dtype=torch.long)}
    ...     return PromptSample(inputs, ids, z, z, z, ids, ids[:0], "")
    >>> b = collate([fake(2), fake(3)], pad_token_id=9, padding_side="left")
    >>> b.inputs["input_ids"].tolist(), b.offsets
    ([[9, 0, 1], [0, 1, 2]], [1, 0])
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    lengths = [s.n_tokens for s in samples]
    width = max(lengths)
    offsets = [width - n if padding_side == "left" else 0 for n in lengths]
    out: dict[str, Any] = {}
    keys = [k for k in samples[0].inputs]
    for s in samples[1:]:
        keys += [k for k in s.inputs if k not in keys]
    for key in keys:
        values = [s.inputs.get(key) for s in samples]
        present = [v for v in values if v is not None]
        if key.startswith(_STACKED_PREFIXES):
            out[key] = _concat_padded(present)
            continue
        ref = present[0]
        fill = pad_token_id if key == "input_ids" else 0
        padded = torch.full((len(samples), width), fill, dtype=ref.dtype)
        for row, (v, n, off) in enumerate(zip(values, lengths, offsets)):
            if v is not None:
                padded[row, off:off + n] = v[0]
        out[key] = padded
    return Batch(list(samples), out, offsets, lengths, padding_side)


def _concat_padded(tensors: Sequence[Any]) -> Any:
    """Concatenate along dim 0, zero-padding the other dims to the largest size.

    LLaVA-NeXT's ``pixel_values`` is ``(images, tiles, 3, H, W)`` with a tile count that depends
    on the image; its processor zero-pads the tiles of a multi-image batch the same way and the
    model keeps each image's real tiles by its ``image_sizes``.

    >>> import torch
    >>> _concat_padded([torch.ones(1, 2), torch.ones(1, 1)]).tolist()
    [[1.0, 1.0], [1.0, 0.0]]
    """
    import torch

    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.ndim)):  # F.pad lists the last dim first
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def length_batches(lengths: Iterable[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group item indices into batches of similar length (fewer pad tokens).

    Items are sorted by length and cut into consecutive runs of at most ``batch_size`` items
    and at most ``max_tokens`` padded tokens; each batch keeps ascending index order.

    >>> length_batches([5, 50, 6, 49], batch_size=2)
    [[0, 2], [1, 3]]
    """
    lengths = list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        widest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) >= batch_size or (max_tokens and widest * (len(current) + 1) > max_tokens)):
            batches.append(sorted(current))
            current = []
        current.append(i)
    if current:
        batches.append(sorted(current))
    return batches
