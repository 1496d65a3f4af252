"""The YAML run configuration: typed, strict models and the loader with ``--set`` overrides.

Unknown keys are errors that name the key and the file, so a typo never silently falls back to a
default. Everything here is pure (pydantic + yaml) and imported by every room.

Examples
--------
>>> cfg = Config.model_validate({"model": {"path": "/models/x"}, "data": {"name": "synthetic"}})
>>> cfg.capture.layers
'all'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.errors import GapError

Layers = Union[Literal["all"], list[int]]
CausalMethod = Literal["zero", "gaussian", "mean", "swap"]
Channel = Literal["visual", "text"]
TruncationMode = Literal["zero", "knockout", "drop"]
TokenSet = Literal["visual", "text", "answer", "other"]
TOKEN_SETS: tuple[str, ...] = get_args(TokenSet)  # also the canonical order of a selection
DatasetName = Literal["chartqa", "docvqa", "textvqa", "vqav2", "scienceqa", "synthetic"]


class ConfigError(GapError, ValueError):
    """A configuration problem, phrased as one line that names the key and the file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class ModelConfig(Strict):
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device_map: Union[str, dict[str, Any], None] = "auto"
    max_memory: Union[dict[str, str], None] = None
    attn_implementation: Union[str, None] = "eager"
    family: Union[str, None] = None  # inferred from the checkpoint's config when None
    revision: Union[str, None] = None
    trust_remote_code: bool = False


class DataConfig(Strict):
    name: DatasetName = "synthetic"
    path: Union[str, None] = None
    split: str = "test"
    config_name: Union[str, None] = None  # hub config, e.g. "DocVQA" for lmms-lab/DocVQA
    limit: Union[int, None] = Field(default=None, ge=0)
    seed: int = 0
    shuffle: bool = False  # seeded sampling of `limit` rows instead of the first rows
    subset: Literal["keywords", "all_hard", "all_easy"] = "keywords"


class CausalConfig(Strict):
    methods: list[CausalMethod] = Field(default_factory=list)
    channels: list[Channel] = Field(default_factory=lambda: ["visual", "text"])
    layers: Layers = "all"
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)  # patched variants per forward


class TruncationConfig(Strict):
    modes: list[TruncationMode] = Field(default_factory=list)
    layers: Layers = "all"
    score: list[Literal["logprob", "generate"]] = Field(default_factory=lambda: ["logprob"])
    max_new_tokens: int = Field(default=16, ge=1)


class CaptureConfig(Strict):
    layers: Layers = "all"
    # Which tokens' activations are stored: "all", or a list of sets: "visual" (image tokens),
    # "text" (the question's tokens, is_text), "answer" (teacher-forced answer, is_answer),
    # "other" (everything else: chat template, system prompt, BOS). Padding is never stored.
    tokens: Union[Literal["all"], list[TokenSet]] = "all"
    activations: bool = True
    store_dtype: Literal["auto", "float16"] = "auto"  # auto = lossless model dtype; float16 is lossy
    batch_size: int = Field(default=1, ge=1)
    causal: CausalConfig = Field(default_factory=CausalConfig)
    truncation: TruncationConfig = Field(default_factory=TruncationConfig)

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_sets(cls, value: Any) -> Any:
        """One canonical form per selection, so a resumed run compares selections, not spellings.

        >>> CaptureConfig(tokens=["text", "visual", "text"]).tokens
        ['visual', 'text']
        >>> CaptureConfig(tokens=["other", "answer", "text", "visual"]).tokens
        'all'
        """
        if value == "all":
            return value
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise ValueError("expected 'all' or a non-empty list of " + ", ".join(TOKEN_SETS))
        unknown = [n for n in names if n not in TOKEN_SETS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a token set; expected 'all' or a list of "
                             + ", ".join(TOKEN_SETS))
        chosen = [n for n in TOKEN_SETS if n in names]
        return "all" if len(chosen) == len(TOKEN_SETS) else chosen


# Slurm's memory sizes: a number with an optional K/M/G/T (binary; megabytes without one).
SLURM_SIZE = re.compile(r"(\d+)([KMGT]?)")
_MEM_PER = re.compile(r"--mem-per-(cpu|gpu)\b(?:(?:=|\s+)(\S*))?")


def slurm_memory_per(mem: str | None, extra: list[str], prefix: str) -> list[tuple[str, str, str]]:
    """Check a job's ``mem`` against the ``--mem-per-cpu``/``--mem-per-gpu`` lines of its ``extra``
    as sbatch would (it refuses both at once); return those lines as (line, cpu|gpu, size).

    Both the rendered sbatch scripts and the Dask Slurm workers' job scripts are checked here.

    >>> slurm_memory_per(None, ["--mem-per-cpu=4G", "-C gpu"], "slurm")
    [('--mem-per-cpu=4G', 'cpu', '4G')]
    >>> slurm_memory_per("64G", ["--mem-per-gpu=8G"], "slurm")
    Traceback (most recent call last):
    ...
    schemas.config.ConfigError: slurm.mem=64G and slurm.extra '--mem-per-gpu=8G' exclude each other in Slurm: set slurm.mem=null
    """
    if mem is not None and not SLURM_SIZE.fullmatch(mem):
        raise ConfigError(f"{prefix}.mem: {mem!r} is not a Slurm memory size (e.g. 64G, 500M, or null "
                          "for none)")
    per = [(item, m.group(1), m.group(2) or "") for item in extra if (m := _MEM_PER.search(item))]
    if mem is not None and per:
        raise ConfigError(f"{prefix}.mem={mem} and {prefix}.extra {per[0][0].strip()!r} exclude each other "
                          f"in Slurm: set {prefix}.mem=null")
    return per


class SlurmAnalysisConfig(Strict):
    partition: Union[str, None] = None  # the site's default partition: a CPU job runs anywhere
    cpus: int = Field(default=8, ge=1)
    mem: Union[str, None] = "32G"  # None: no --mem (the site's default, or --mem-per-cpu in extra)
    time: str = "01:00:00"
    extra: list[str] = Field(default_factory=list)


class SlurmConfig(Strict):
    partition: Union[str, None] = "gpu"
    gpus: int = Field(default=1, ge=0)
    cpus: int = Field(default=8, ge=1)
    mem: Union[str, None] = "64G"  # None: no --mem (the site's default, or --mem-per-cpu in extra)
    time: str = "02:00:00"
    shards: int = Field(default=1, ge=1)
    setup: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)
    signal_seconds: int = Field(default=300, ge=0)  # SIGUSR1 this long before the time limit
    analysis: SlurmAnalysisConfig = Field(default_factory=SlurmAnalysisConfig)


class AnalysisConfig(Strict):
    """Metric parameters and the checkpoint thresholds (RESEARCH.md section 4 defaults)."""

    tau: float = 0.01
    tau_ratio: Union[float, None] = None  # adaptive tau = ratio * mean D(0) when set
    cliff_method: Literal["median_evd", "gradient", "threshold_crossing"] = "median_evd"
    massive_k: float = 100.0  # tokens with norm > k x layer median are "massive"
    cka_tokens: int = Field(default=64, ge=4)  # per sample and modality in the layer x layer CKA
    bootstrap: int = Field(default=1000, ge=10)
    seed: int = 0
    cp1_hard_drop_go: float = 0.05
    cp1_easy_drop_max: float = 0.01
    cp1_hard_drop_marginal: float = 0.03
    cp2_alpha: float = 0.05
    cp3_visual_er_ratio: float = 0.7
    cp3_text_er_ratio: float = 0.85
    cp3_icc_increase: float = 0.05
    cp3_cka_increase: float = 0.05
    cp3_window: int = Field(default=2, ge=1)  # layers averaged before/after the cliff


class Config(Strict):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)


# Keys that may differ between writers of one run (where and how it ran, not what it measures).
RUN_INVARIANT_EXCLUDED = ("slurm", "analysis", "capture.batch_size", "capture.causal.batch_size",
                          "model.device_map", "model.max_memory")


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    return f"{source}: invalid value for '{key}': {first['msg']}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=VALUE`` into its key path and its YAML-parsed value.

    >>> parse_override("capture.layers=[0, 4]")
    (['capture', 'layers'], [0, 4])
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(exc, 'column')})") from None
    return key.strip().split("."), value


def _yaml_problem(exc: yaml.YAMLError, where: str = "line") -> str:
    """What the YAML parser objects to and where (1-based), e.g. "expected ',' or ']' at line 3, column 9".

    >>> try:
    ...     yaml.safe_load("a: [1, 2")
    ... except yaml.YAMLError as e:
    ...     print(_yaml_problem(e))
    expected ',' or ']', but got '<stream end>' at line 1, column 9
    """
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    at = f"column {mark.column + 1}" if where == "column" else f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{problem} at {at}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``raw`` with each ``a.b=VALUE`` override applied (creating missing sections)."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict; errors become one-line :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  "in one mapping (the first would be silently dropped)")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's YAML as a plain mapping, not yet validated: safe loading, a key given twice
    refused, one-line errors naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with every key of ``update`` set into it, nested mappings merged key by key.

    >>> deep_merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 5}})
    {'a': {'x': 1, 'y': 5}, 'b': 3}
    """
    out = dict(base)
    for key, value in update.items():
        out[key] = (deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config with safe loading, apply ``--set`` overrides, validate.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "c.yaml")
    >>> _ = open(p, "w").write("model: {path: /m}\\n")
    >>> load_config(p, ["data.limit=3"]).data.limit
    3
    """
    path = Path(path)
    raw = apply_overrides(read_config_yaml(path), overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:  # name the --set that brought the bad key, not the file
        loc = tuple(str(p) for p in err.errors()[0]["loc"])
        keys = [tuple(parse_override(item)[0]) for item in overrides or []]
        by_set = any(loc[:len(k)] == k or k[:len(loc)] == loc for k in keys)
        raise ConfigError(_format_error(err, "--set" if by_set else str(path))) from None


def config_to_yaml(cfg: Config) -> str:
    """The canonical YAML form stored in a run's attrs."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True)


def resolve_layers(layers: Layers, n_layers: int) -> list[int]:
    """Turn ``all`` or a list (negative indices allowed) into sorted layer indices.

    >>> resolve_layers("all", 3)
    [0, 1, 2]
    >>> resolve_layers([-1, 0], 4)
    [0, 3]
    """
    if layers == "all":
        return list(range(n_layers))
    out = set()
    for layer in layers:
        idx = layer + n_layers if layer < 0 else layer
        if not 0 <= idx < n_layers:
            raise ConfigError(f"layer {layer} out of range for a model with {n_layers} layers")
        out.add(idx)
    return sorted(out)


def invariant_view(cfg: Config) -> dict[str, Any]:
    """The part of a config that must match for two writers to share one run."""
    data = cfg.model_dump(mode="json")
    for dotted in RUN_INVARIANT_EXCLUDED:
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return data


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first difference between two nested dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return sub
            found = first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    return None if a == b else (prefix or "<root>")
