"""Model-family adapters: the only code that knows a layer path, a token id or a family quirk.

A :class:`FamilyAdapter` subclass lives in one short file per family (``capture/llava.py``,
``capture/qwen2_vl.py``, ...). The registry maps a checkpoint's ``config.model_type`` to its
adapter; :func:`load_model` reads the checkpoint's config, picks the adapter and loads processor
and model through the same ``from_pretrained`` calls for local directories and hub ids.

Everything else in ``capture/`` (prompts, the capture loop, interventions) is family-agnostic and
goes through :class:`LoadedModel`: ``loaded.layers()`` for the decoder blocks as torch modules,
``loaded.layer_envoys(envoy)`` for the same blocks inside an nnsight trace,
``loaded.image_token_id``, ``loaded.forward_inputs(batch_inputs)``.

Examples
--------
>>> from capture.family import supported_families
>>> supported_families()
['llava', 'llava_next', 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe']
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from schemas.errors import GapError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from schemas.config import ModelConfig

log = logging.getLogger(__name__)

# One module per family; each defines ``ADAPTER``. The registry is derived from them.
FAMILY_MODULES = ("capture.llava", "capture.llava_next", "capture.qwen2_vl", "capture.qwen2_5_vl",
                  "capture.qwen3_vl", "capture.qwen3_vl_moe")


class FamilyAdapter:
    """What capture needs to know about one model family.

    Subclasses set the class attributes and override the hooks whose default does not fit.
    Adapters hold no state; one instance serves every model of the family.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter handles
    model_class: ClassVar[str]  # transformers class name used to load the model
    layers_path: ClassVar[str] = "model.language_model.layers"  # decoder blocks, from the top model
    final_norm_path: ClassVar[str] = "model.language_model.norm"

    def text_config(self, config: Any) -> Any:
        """The language model's sub-config (layer count, width)."""
        return getattr(config, "text_config", config)

    def image_token_id(self, config: Any) -> int:
        """Id of the token that marks one visual position in ``input_ids``."""
        return int(config.image_token_id)

    def deepstack_layers(self, config: Any) -> list[int]:
        """Decoder layers after whose output vision features are added (Qwen3-VL DeepStack)."""
        return []

    def forward_keys(self) -> tuple[str, ...]:
        """Processor outputs the model's forward takes (the rest are dropped)."""
        return ("input_ids", "attention_mask", "pixel_values")

    def needs_position_ids(self) -> bool:
        """Whether capture passes explicit 1-D ``position_ids`` (cumsum of the attention mask).

        Families with multimodal RoPE (Qwen) compute their own 3-D positions from the mask and
        the image grid; passing 1-D ones would be wrong there.
        """
        return False

    # -- shared machinery (no family knowledge below) ---------------------------------------
    def resolve(self, root: Any, dotted: str) -> Any:
        """Follow a dotted attribute path on a torch module or an nnsight envoy."""
        node = root
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


@dataclass
class LoadedModel:
    """A loaded checkpoint: model, processor, adapter and the facts a run records.

    Attributes
    ----------
    model
        The ``transformers`` model in eval mode.
    processor
        Its ``AutoProcessor`` (tokenizer, image processor, chat template).
    adapter
        The family's :class:`FamilyAdapter`.
    info
        ``model_info``: family, model_type, n_layers, hidden_size, image_token_id,
        deepstack_layers, layers_path, revision, path, dtype, attn_implementation,
        trust_remote_code (run-invariant facts only: shards on other machines must agree).
    """

    model: Any
    processor: Any
    adapter: FamilyAdapter
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.info["n_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.info["hidden_size"])

    @property
    def image_token_id(self) -> int:
        return int(self.info["image_token_id"])

    @property
    def pad_token_id(self) -> int:
        tok = self.processor.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings (where batches go, also under ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    def layers(self) -> list[Any]:
        """The decoder blocks as torch modules, in execution order."""
        return list(self.adapter.resolve(self.model, self.adapter.layers_path))

    def layer_envoys(self, envoy: Any) -> list[Any]:
        """The same blocks inside an ``nnsight.NNsight(model)`` wrapper ``envoy``."""
        blocks = self.adapter.resolve(envoy, self.adapter.layers_path)
        return [blocks[i] for i in range(self.n_layers)]

    def final_norm(self) -> Any:
        """The language model's final norm (applied after the last block, before the head)."""
        return self.adapter.resolve(self.model, self.adapter.final_norm_path)

    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Keep the processor outputs the forward takes, add explicit positions where needed."""
        out = {k: v for k, v in inputs.items() if k in self.adapter.forward_keys()}
        if self.adapter.needs_position_ids() and "attention_mask" in inputs:
            mask = inputs["attention_mask"]
            out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return out


_REGISTRY: dict[str, FamilyAdapter] = {}


def _registry() -> dict[str, FamilyAdapter]:
    if not _REGISTRY:
        for name in FAMILY_MODULES:
            adapter = importlib.import_module(name).ADAPTER
            for model_type in adapter.model_types:
                _REGISTRY[model_type] = adapter
    return _REGISTRY


def supported_families() -> list[str]:
    """Names of the supported families (sorted)."""
    return sorted({a.family for a in _registry().values()})


def adapter_for(model_type: str, family: str | None = None) -> FamilyAdapter:
    """The adapter for a ``config.model_type`` (or an explicit family name, which wins).

    Raises
    ------
    GapError
        For an unknown family, listing the supported ones.

    Examples
    --------
    >>> adapter_for("llava").layers_path
    'model.language_model.layers'
    """
    registry = _registry()
    if family is not None:
        for adapter in registry.values():
            if adapter.family == family:
                return adapter
        raise GapError(f"model.family {family!r} is not supported; supported families: "
                       f"{', '.join(supported_families())}")
    if model_type not in registry:
        raise GapError(f"model type {model_type!r} is not supported; supported families: "
                       f"{', '.join(supported_families())} (model types {', '.join(sorted(registry))})")
    return registry[model_type]


def _revision(path: str, config: Any, requested: str | None) -> str | None:
    """The commit a checkpoint came from when it can be known offline."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    # A local directory inside a hub cache is named .../snapshots/<commit>.
    match = re.search(r"snapshots/([0-9a-f]{40})", str(Path(path).resolve()))
    return match.group(1) if match else requested


# What a hub repo id looks like ("llava-hf/llava-1.5-7b-hf"): a path of this form that is not
# a local directory goes to transformers, which looks it up in the offline hub cache.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _checkpoint_path(path: str) -> str:
    """Where ``from_pretrained`` loads ``model.path`` from: a local directory (``~`` expanded)
    or a hub id, as given.

    Parameters
    ----------
    path : str
        ``model.path``.

    Returns
    -------
    str
        The directory, or the hub id.

    Raises
    ------
    GapError
        A path that is clearly local (absolute, ``./``, ``../``, ``~``, or several components)
        and does not exist, or a directory without ``config.json``: one line at once, instead of
        transformers' complaint about a malformed repo id or a missing ``model_type``.

    Examples
    --------
    >>> _checkpoint_path("llava-hf/llava-1.5-7b-hf")
    'llava-hf/llava-1.5-7b-hf'
    >>> _checkpoint_path("/nonexistent/llava")
    Traceback (most recent call last):
    ...
    schemas.errors.GapError: model.path /nonexistent/llava: no such directory
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise GapError(f"model.path {path}: no config.json (not a transformers checkpoint directory)")
        return str(local)
    if local.exists():
        raise GapError(f"model.path {path}: not a directory")
    if (local.is_absolute() or path.startswith(("./", "../", "~"))
            or (os.sep in path and not _HUB_ID.fullmatch(path))):
        raise GapError(f"model.path {path}: no such directory")
    return path


def _max_memory(spec: dict[str, str] | None) -> dict[Any, str] | None:
    # accelerate wants GPU indices as ints ("0": "70GiB" in YAML -> 0: "70GiB").
    if not spec:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in spec.items()}


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load processor and model for a ``model:`` config section (local dir or hub id).

    ``device_map: auto`` spreads the model over the visible GPUs (``max_memory`` caps each);
    on a machine without CUDA it means CPU. ``trust_remote_code`` is passed only when the
    config sets it.

    Examples
    --------
    >>> import tempfile
    >>> from schemas.config import ModelConfig
    >>> from capture.tiny import build_tiny
    >>> path = build_tiny("qwen2_vl", tempfile.mkdtemp(), n_layers=2)
    >>> loaded = load_model(ModelConfig(path=str(path), dtype="float32"))
    >>> loaded.info["family"], loaded.n_layers, len(loaded.layers())
    ('qwen2_vl', 2, 2)
    """
    path = _checkpoint_path(cfg.path)  # before the imports: a wrong path fails at once

    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    common: dict[str, Any] = {"revision": cfg.revision}
    if cfg.trust_remote_code:
        common["trust_remote_code"] = True
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        raise GapError(f"model.path {cfg.path}: cannot read the model config "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    adapter = adapter_for(config.model_type, cfg.family)
    kwargs: dict[str, Any] = dict(common, dtype=getattr(torch, cfg.dtype))
    device_map = cfg.device_map
    if device_map == "auto" and not torch.cuda.is_available():
        device_map = None  # accelerate's CPU dispatch only adds hooks here
    if device_map is not None:
        kwargs["device_map"] = device_map
        if cfg.max_memory:
            kwargs["max_memory"] = _max_memory(cfg.max_memory)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model_cls = getattr(transformers, adapter.model_class)
    log.info("loading %s (%s) from %s", adapter.family, config.model_type, path)
    processor = AutoProcessor.from_pretrained(path, **common)
    model = model_cls.from_pretrained(path, **kwargs).eval()
    return wrap_model(model, processor, adapter, path=str(cfg.path),
                      revision=_revision(path, model.config, cfg.revision),
                      attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)


def wrap_model(model: Any, processor: Any, adapter: FamilyAdapter | None = None, *, path: str = "<in memory>",
               revision: str | None = None, attn_implementation: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """A :class:`LoadedModel` around a model and processor already in memory.

    :func:`load_model` ends here; benchmarks use it for random-weight models of real shapes.

    Examples
    --------
    >>> import tempfile
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> from capture.tiny import build_tiny
    >>> path = build_tiny("llava", tempfile.mkdtemp(), n_layers=2)
    >>> model = AutoModelForImageTextToText.from_pretrained(path)
    >>> proc = AutoProcessor.from_pretrained(path)
    >>> wrap_model(model, proc).info["n_layers"]
    2
    """
    adapter = adapter or adapter_for(model.config.model_type)
    text = adapter.text_config(model.config)
    image_token_id = adapter.image_token_id(model.config)
    tok_image = getattr(processor, "image_token_id", None)
    if tok_image is not None and int(tok_image) != image_token_id:
        raise GapError(f"model.path {path}: processor image token id {tok_image} differs from "
                       f"the model config's {image_token_id}")
    dtype = model.get_input_embeddings().weight.dtype
    info = {
        "family": adapter.family,
        "model_type": model.config.model_type,
        "model_class": adapter.model_class,
        "n_layers": int(text.num_hidden_layers),
        "hidden_size": int(text.hidden_size),
        "image_token_id": image_token_id,
        "deepstack_layers": adapter.deepstack_layers(model.config),
        "layers_path": adapter.layers_path,
        "path": path,
        "revision": revision,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation,
        "trust_remote_code": bool(trust_remote_code),
    }
    return LoadedModel(model=model, processor=processor, adapter=adapter, info=info)
