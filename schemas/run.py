"""The run schema as code: every variable of a run, its dims, dtype, fill value and meaning.

This is the single source used by the store writer (validation), ``gap store verify``, the
xarray view and the docs (``python -m schemas.run`` prints the table).  It also defines
:class:`SampleRecord`, the unit that capture hands to the store's writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

STATUS_OK = "ok"
# Failure kinds.  Only data errors are an acceptable outcome of a run (exit code 0); the others
# are retried by ``gap capture --resume --retry-failed`` (RETRYABLE).
STATUS_DATA = "data_error"
STATUS_NONFINITE = "nonfinite"
STATUS_OOM = "oom"
STATUS_ERROR = "error"
RETRYABLE = (STATUS_NONFINITE, STATUS_OOM, STATUS_ERROR)
# Exit status of `gap capture` / `gap analyze` after a stop (SIGUSR1/SIGTERM) that committed
# nothing new: the Slurm job scripts then fail instead of requeueing into the same wall.
STOPPED_WITHOUT_PROGRESS = 3
TOKEN_FLAG_VISUAL = 1
TOKEN_FLAG_TEXT = 2
TOKEN_FLAG_ANSWER = 4


@dataclass(frozen=True)
class Variable:
    name: str
    dims: tuple[str, ...]
    dtype: str  # numpy dtype string, or "str" for unicode text
    fill: Any
    doc: str
    needs: str = ""  # the config choice without which a run has no such variable ("": none)

    @property
    def level(self) -> str:
        """``hidden``, ``token`` or ``sample``: how the variable is laid out on disk."""
        if self.name == "hidden":
            return "hidden"
        return "token" if self.dims[:1] == ("token",) else "sample"


_NAN = float("nan")

VARIABLES: dict[str, Variable] = {v.name: v for v in [
    Variable("hidden", ("layer", "token", "hidden_dim"), "float32", _NAN,
             "residual stream after decoder block `layer` (transformers' hidden_states[layer + 1])"),
    # per token (ragged axis over all tokens of all samples)
    Variable("token_sample", ("token",), "int64", -1, "index along `sample` of the token's sample"),
    Variable("input_ids", ("token",), "int32", -1, "token id of each stored token (capture.tokens; default all)"),
    Variable("position", ("token",), "int32", -1, "0-based position of the token in its sequence"),
    Variable("is_visual", ("token",), "bool", False, "token is one of the sample's image tokens"),
    Variable("is_text", ("token",), "bool", False, "token belongs to the question text"),
    Variable("is_answer", ("token",), "bool", False, "token is a teacher-forced gold answer token"),
    # per sample
    Variable("sample_id", ("sample",), "str", "", "stable id: dataset/split/row"),
    Variable("sample_index", ("sample",), "int64", -1, "row in the configured selection (sort key)"),
    Variable("question", ("sample",), "str", "", "question text"),
    Variable("answer", ("sample",), "str", "", "gold answer used for teacher forcing"),
    Variable("answers", ("sample",), "str", "[]", "all gold answers, as a JSON list"),
    Variable("subset", ("sample",), "str", "", "hard / easy / medium label"),
    Variable("status", ("sample",), "str", "", "`ok` or the error kind"),
    Variable("error", ("sample",), "str", "", "one-line error, empty when ok"),
    Variable("n_tokens", ("sample",), "int32", 0, "stored tokens of the sample (its whole sequence by default)"),
    Variable("n_visual", ("sample",), "int32", 0, "stored visual tokens of the sample"),
    Variable("nonfinite_layer", ("sample",), "int32", -1, "first layer with NaN/inf (-1: none)"),
    Variable("fp16_overflow", ("sample",), "int64", 0, "values clipped by lossy float16 storage"),
    Variable("logp_clean", ("sample",), "float64", _NAN, "sum of gold answer token log-probs"),
    Variable("logp_patched", ("sample", "layer", "method", "channel"), "float64", _NAN,
             "answer log-prob with `channel` patched by `method` at the output of `layer`"),
    Variable("delta", ("sample", "layer", "method", "channel"), "float64", _NAN,
             "logp_clean - logp_patched"),
    Variable("swap_donor", ("sample",), "str", "", "sample_id of the swap donor (empty: none usable)",
             needs="swap"),
    Variable("donor_logp_clean", ("sample",), "float64", _NAN,
             "log-prob of the donor's answer on the clean input", needs="swap"),
    Variable("donor_logp_patched", ("sample", "layer", "channel"), "float64", _NAN,
             "log-prob of the donor's answer after the swap patch", needs="swap"),
    Variable("trunc_logp", ("sample", "trunc_layer", "mode"), "float64", _NAN,
             "answer log-prob with visual tokens truncated after `trunc_layer` (-1: none)"),
    Variable("trunc_text", ("sample", "trunc_layer", "mode"), "str", "",
             "greedy generation under the same truncation", needs="generate"),
]}

# Coordinates of the non-sample dims of sample-level variables (values set per run).
COORD_DIMS = ("layer", "method", "channel", "trunc_layer", "mode")


def produced(var: Variable, config: dict[str, Any]) -> bool:
    """Whether a run of ``config`` (the run's config as a plain dict) has ``var``: ``trunc_text``
    needs ``capture.truncation.score`` to generate, the donor variables the ``swap`` method.

    >>> produced(VARIABLES["trunc_text"], {"capture": {"truncation": {"score": ["logprob"]}}})
    False
    """
    capture = config.get("capture") or {}
    if var.needs == "generate":
        return "generate" in ((capture.get("truncation") or {}).get("score") or [])
    if var.needs == "swap":
        return "swap" in ((capture.get("causal") or {}).get("methods") or [])
    return True


def sample_variables() -> list[Variable]:
    return [v for v in VARIABLES.values() if v.level == "sample"]


def token_variables() -> list[Variable]:
    return [v for v in VARIABLES.values() if v.level == "token" and v.name != "token_sample"]


@dataclass
class SampleRecord:
    """One captured sample, as capture hands it to the store writer.

    ``hidden`` is ``(n_layers_captured, n_tokens, hidden_size)`` in the run's storage encoding
    (bfloat16 as its uint16 bit pattern, float32, or float16) or None when activations are off.
    ``values`` maps sample-level variable names (schema above) to arrays shaped by their
    non-sample dims (scalars for ``("sample",)``).  Missing values are stored as fill.
    """

    index: int
    sample_id: str
    question: str = ""
    answer: str = ""
    answers: list[str] = field(default_factory=list)
    subset: str = ""
    status: str = STATUS_OK
    error: str = ""
    input_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    position: np.ndarray | None = None
    is_visual: np.ndarray | None = None
    is_text: np.ndarray | None = None
    is_answer: np.ndarray | None = None
    hidden: np.ndarray | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(len(self.input_ids))

    def token_flags(self) -> np.ndarray:
        n = self.n_tokens
        flags = np.zeros(n, np.int32)
        for arr, bit in ((self.is_visual, TOKEN_FLAG_VISUAL), (self.is_text, TOKEN_FLAG_TEXT),
                         (self.is_answer, TOKEN_FLAG_ANSWER)):
            if arr is not None:
                flags |= np.asarray(arr, bool).astype(np.int32) * bit
        return flags


def failed_record(index: int, sample_id: str, error: str, status: str = "error", **fields: Any) -> SampleRecord:
    """A record for a sample that could not be captured (kept so it is not retried forever)."""
    return SampleRecord(index=index, sample_id=sample_id, status=status, error=error, **fields)


def shard_indices(n_items: int, shard: int, n_shards: int) -> list[int]:
    """Rows of the selection that writer ``shard`` of ``n_shards`` owns (strided, balanced).

    >>> shard_indices(10, 1, 3)
    [1, 4, 7]
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    return list(range(shard, n_items, n_shards))


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (0-based I).

    >>> parse_shard("2/4")
    (2, 4)
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def schema_table() -> str:
    """Markdown table of the schema (used by the docs)."""
    rows = ["| name | dims | dtype | fill | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES.values():
        needs = f" (only with `{v.needs}`)" if v.needs else ""
        rows.append(f"| `{v.name}` | {', '.join(v.dims)} | {v.dtype} | {v.fill!r} | {v.doc}{needs} |")
    return "\n".join(rows)
