"""Input tensors for a benchmark, seeded, from the artifact's metadata or the model's signature.

The export metadata (`FILE.json` key `inputs`: name, dtype, shape with symbolic dims as strings,
`range` for integer inputs, `dim_defaults` for a symbolic dim's size unless the job names one) is preferred.
Symbolic dims are sized from the job's `dims`, then the input's `dim_defaults`, then DEFAULT_DIMS, then by name
(batch-like 1, sequence-like 64); every choice is recorded.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeqError
from .protocol import DEFAULT_DIMS

_SEQ_WORDS = ("seq", "len", "token", "time", "position")


def _size(value) -> bool:
    """Whether a metadata `dim_defaults` value is a dim size (what config.dims accepts)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 20


def _dim(value, position: int, dims: dict[str, int], used: dict[str, int], defaults: dict) -> int:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value:
        if value in dims:
            size = dims[value]
        elif _size(defaults.get(value)):
            size = defaults[value]
        elif value in DEFAULT_DIMS:
            size = DEFAULT_DIMS[value]
        elif "batch" in value.lower():
            size = dims.get("batch", DEFAULT_DIMS["batch"])
        elif any(w in value.lower() for w in _SEQ_WORDS):
            size = dims.get("sequence", DEFAULT_DIMS["sequence"])
        else:
            size = dims.get("sequence", DEFAULT_DIMS["sequence"]) if position > 0 else dims.get("batch", 1)
        used[value] = size
        return size
    # unnamed dynamic dim (TFLite -1, ONNX None): batch first, then sequence
    key = "batch" if position == 0 else "sequence"
    size = dims.get(key, DEFAULT_DIMS[key])
    used[f"<dim {position}>"] = size
    return size


def make_inputs(spec: list[dict], dims: dict[str, int], seed: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Arrays for each input of `spec` and a record of what was fed (name, dtype, shape, range). Every shape is
    sized and checked (1 GiB an input, 2 GiB together) before any array is made."""
    planned, total = [], 0
    for item in spec:
        name, dtype = item.get("name"), item.get("dtype")
        if not isinstance(name, str) or not isinstance(item.get("shape"), list):
            raise EdgeqError(f"metadata inputs: each input needs a name and a shape list, got {item!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise EdgeqError(f"metadata inputs: {name}: unknown dtype {dtype!r}") from None
        used: dict[str, int] = {}
        defaults = item.get("dim_defaults") if isinstance(item.get("dim_defaults"), dict) else {}
        shape = tuple(_dim(d, i, dims, used, defaults) for i, d in enumerate(item["shape"]))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if nbytes > 1 << 30:
            raise EdgeqError(f"inputs: {name} of shape {shape} would need more than 1 GiB")
        total += nbytes
        planned.append((item, name, dt, shape, used))
    if total > 2 << 30:  # e.g. 60 KV caches at a huge --dim slots
        raise EdgeqError(f"inputs: the {len(planned)} inputs would need {total / (1 << 30):.1f} GiB together, more than 2 "
                         f"(dims: {dict(dims)})")
    rng = np.random.default_rng(seed)
    feeds, record = {}, []
    for item, name, dt, shape, used in planned:
        value_range = item.get("range")
        if dt.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif dt.kind in "iu":
            if "mask" in name.lower() and value_range is None:
                lo, hi = 1, 2
            elif value_range is not None:
                lo, hi = int(value_range[0]), max(int(value_range[1]), int(value_range[0]) + 1)
            else:
                lo, hi = 0, 32
            arr = rng.integers(lo, hi, size=shape).astype(dt)
            value_range = [lo, hi]
        else:
            arr = rng.standard_normal(size=shape).astype(dt)
        feeds[name] = arr
        record.append({"name": name, "dtype": dt.name, "shape": list(shape), "dims": used,
                       "range": value_range, "from": item.get("from", "metadata")})
    return feeds, record


def asked_dims(result: dict) -> dict[str, int]:
    """The job's dims (config `dims`, `edgeq profile --dim`) that sized an input of a result, as its inputs record
    them: what the measurement was taken at beyond the file's own shapes (a decode step's `slots`)."""
    asked = (result.get("config") or {}).get("dims") or {}
    used = {k: v for item in result.get("inputs") or [] for k, v in (item.get("dims") or {}).items()}
    return {k: v for k, v in sorted(used.items()) if k in asked}


def dims_label(dims: dict[str, int]) -> str:
    """` [slots=64]`: how a result's `asked_dims` are named after its artifact; empty without any."""
    return f" [{' '.join(f'{k}={v}' for k, v in dims.items())}]" if dims else ""
