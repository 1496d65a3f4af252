"""How values are encoded on disk and decoded for the view (pure numpy, no torch).

- ``bfloat16`` activations are stored as their uint16 bit pattern (lossless; Zarr v3 and xarray
  have no bfloat16) and decoded to float32 by a 16-bit shift, which is exact.
- ``float32`` is stored as is.  ``float16`` is the one lossy choice: opt-in, and the number of
  values clipped to the float16 range is recorded per sample (``fp16_overflow``).
- Sample-level values travel in the commit log as JSON (Python's float repr round-trips exactly;
  NaN is kept).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.run import VARIABLES, Variable

FLOAT16_MAX = float(np.finfo(np.float16).max)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode bfloat16 bit patterns (uint16) to float32, exactly.

    >>> bf16_bits_to_float32(np.array([0x3F80, 0xC000], np.uint16))
    array([ 1., -2.], dtype=float32)
    """
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the bit patterns (for tests and fakes).

    NaNs stay NaN (quiet), where rounding their payload would carry into the sign bit:

    >>> bits = float32_to_bf16_bits(np.array([1.0, 1.00390625, -np.inf], np.float32))
    >>> [hex(b) for b in bits]
    ['0x3f80', '0x3f80', '0xff80']
    >>> np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([0x7FFFFFFF, 0xFFFFFFFF], np.uint32)
    ...                                                         .view(np.float32)))).all()
    np.True_
    """
    u = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> 16) | np.uint32(0x40), rounded >> 16).astype(np.uint16)


def to_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Lossy float16 with clipping; returns the array and how many values were clipped."""
    values = np.asarray(values, np.float32)
    over = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), over


def decode_hidden(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored hidden values -> float32."""
    if encoding == "bfloat16":
        return bf16_bits_to_float32(stored)
    return np.asarray(stored).astype(np.float32, copy=False)


def value_shape(var: Variable, coords: dict[str, list[Any]]) -> tuple[int, ...]:
    return tuple(len(coords[d]) for d in var.dims[1:])


def encode_value(name: str, value: Any, coords: dict[str, list[Any]]) -> Any:
    """Check a sample-level value against the schema and make it JSON-ready."""
    var = VARIABLES.get(name)
    if var is None or var.level != "sample":
        raise KeyError(f"{name!r} is not a sample-level variable of the run schema")
    shape = value_shape(var, coords)
    if var.dtype == "str":
        arr = np.asarray(value, dtype=object)
        if arr.shape != shape:
            raise ValueError(f"{name}: shape {arr.shape} != {shape} from the run's coords")
        return arr.tolist() if shape else str(value)
    arr = np.asarray(value, dtype=var.dtype)
    if arr.shape != shape:
        raise ValueError(f"{name}: shape {arr.shape} != {shape} from the run's coords")
    return arr.tolist()


def decode_values(name: str, items: list[Any], coords: dict[str, list[Any]]) -> np.ndarray:
    """Stack per-sample JSON values (None = missing) into one array filled per the schema."""
    var = VARIABLES[name]
    shape = (len(items), *value_shape(var, coords))
    if var.dtype == "str":
        out = np.full(shape, var.fill, dtype=object)
    else:
        out = np.full(shape, var.fill, dtype=var.dtype)
    for i, item in enumerate(items):
        if item is not None:
            out[i] = np.asarray(item, dtype=object if var.dtype == "str" else var.dtype)
    if var.dtype == "str":
        out = out.astype(str) if out.size else out.astype(str)
    return out
