"""What a board computed, small enough to send back, and whether the host's runtime computes the same.

After the timed runs the runner invokes the file once more on the same seeded inputs and digests every output
(`digest`): its shape and dtype, its values at `SAMPLE` evenly spaced flat positions (fewer per tensor when a file
has many outputs, e.g. a decoder's KV caches: at most `TOTAL` values in all), the index of its largest value along
the last axis for up to `ROWS` rows (a language model's next token at each position), how many values are not
finite, and the sha256 of the inputs it ran on. The host runs the same file with the same inputs in its own runtime
(`output_check`, from `host.profile`) and `compare`s: the cosine and largest difference of the sampled values, and how often the
rows' largest entries agree. A board whose runtime computes something else (tflite-runtime 2.14 runs dynamic-int8
and INT4 files with wrong results) shows up there, whatever its latency. Torch-free, like the rest of the agent.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from ..console import native_chatter_dropped

SAMPLE = 1024  # values per output tensor at most
TOTAL = 16384  # values over all outputs at most
ROWS = 1024  # rows whose argmax is kept, per output
# the host's outputs agree with the board's when, over every output: cosine of the samples >= COS and rows' argmax
# agreement >= ARGMAX (the parity tolerance of a dynamic-int8 file: two CPUs' kernels may round differently)
COS, ARGMAX = 0.99, 0.9


def inputs_sha256(feeds: dict[str, np.ndarray]) -> str:
    """One hash of the named inputs, in name order: the host checks it made the inputs the board ran on."""
    h = hashlib.sha256()
    for name in sorted(feeds):
        arr = np.ascontiguousarray(feeds[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _positions(size: int, k: int) -> np.ndarray:
    """k evenly spaced flat positions (all of them for a small tensor): no random stream, so any numpy agrees."""
    return np.arange(size, dtype=np.int64) if size <= k else (np.arange(k, dtype=np.int64) * size) // k


def _value(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None  # JSON has no NaN or infinity


def digest(outputs: list[tuple[str, np.ndarray]], feeds: dict[str, np.ndarray]) -> dict:
    """The digest of one run's `outputs` (name, array), in the order the runtime lists them."""
    k = max(64, min(SAMPLE, TOTAL // max(1, len(outputs))))
    tensors = []
    for name, arr in outputs:
        arr = np.asarray(arr)
        flat = arr.reshape(-1)
        entry = {"name": name, "shape": list(arr.shape), "dtype": arr.dtype.name, "size": int(flat.size),
                 "sample": [_value(v) for v in flat[_positions(flat.size, k)].astype(np.float64)],
                 "nonfinite": int(np.count_nonzero(~np.isfinite(flat))) if arr.dtype.kind in "fc" else 0,
                 "argmax": None}
        if arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[-1] > 1:
            rows = arr.reshape(-1, arr.shape[-1])
            entry["argmax"] = np.argmax(rows[_positions(rows.shape[0], ROWS)], axis=-1).tolist()
        tensors.append(entry)
    return {"inputs_sha256": inputs_sha256(feeds), "per_tensor_sample": k, "tensors": tensors}


def compare(board: dict, host: dict) -> dict:
    """How the host's digest of the same file and inputs matches the board's: per output and worst over them."""
    if board.get("inputs_sha256") != host.get("inputs_sha256"):
        return {"compared": False, "why": "the host made other inputs than the board from the same seed (another "
                                          "numpy random stream?)"}
    mine = {t["name"]: t for t in host["tensors"]}
    per, missing = [], []
    for t in board.get("tensors") or []:
        h = mine.get(t["name"])
        if h is None or h["shape"] != t["shape"] or len(h["sample"]) != len(t["sample"]):
            missing.append(t["name"])
            continue
        a = np.array([np.nan if v is None else v for v in t["sample"]], dtype=np.float64)
        b = np.array([np.nan if v is None else v for v in h["sample"]], dtype=np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        na, nb = np.linalg.norm(a[both]), np.linalg.norm(b[both])
        cos = 1.0 if na == nb == 0 else float(a[both] @ b[both] / (na * nb)) if na and nb else 0.0
        entry = {"name": t["name"], "cos": cos, "max_abs": float(np.max(np.abs(a[both] - b[both]), initial=0.0)),
                 "nonfinite": [t["nonfinite"], h["nonfinite"]], "argmax_agree": None}
        if t.get("argmax") is not None and h.get("argmax") is not None and len(t["argmax"]) == len(h["argmax"]):
            entry["argmax_agree"] = float(np.mean(np.array(t["argmax"]) == np.array(h["argmax"])))
        per.append(entry)
    if not per:
        return {"compared": False, "why": f"no output of the board's matches the host's ({', '.join(missing)})"}
    argmax = [e["argmax_agree"] for e in per if e["argmax_agree"] is not None]
    out = {"compared": True, "cos_min": min(e["cos"] for e in per), "max_abs": max(e["max_abs"] for e in per),
           "argmax_agree": min(argmax) if argmax else None,
           "nonfinite_differ": [e["name"] for e in per if e["nonfinite"][0] != e["nonfinite"][1]],
           "outputs": per, "not_compared": missing}
    out["agrees"] = (out["cos_min"] >= COS and (out["argmax_agree"] is None or out["argmax_agree"] >= ARGMAX)
                     and not out["nonfinite_differ"])
    return out


def host_digest(path: Path, result: dict) -> dict:
    """The file run here, in this host's runtime, on the inputs the board's result records (remade from its seed):
    {"digest", "runtime"}, or {"why"} when this host cannot run it."""
    from .inputs import make_inputs
    from .runtimes import load

    cfg = result.get("config") or {}
    try:
        spec = [{k: item.get(k) for k in ("name", "dtype", "shape", "range")} for item in result.get("inputs") or []]
        feeds, _ = make_inputs(spec, {}, int(cfg.get("seed", 0)))
        with native_chatter_dropped():  # the CLI's process: LiteRT's first delegate announces itself
            model = load(path, 1, cfg.get("signature"), bool(cfg.get("weight_cache")))
        model.prepare(feeds)
        return {"digest": digest(model.outputs(), feeds),
                "runtime": f"{model.runtime.get('name')} {model.runtime.get('version')} on this host"}
    except Exception as exc:  # a runtime's errors are plain Exceptions: the board's result stands without the check
        return {"why": f"this host could not run the file ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"}


def output_check(path: Path, sha256: str, result: dict, references: dict, lock: threading.Lock) -> dict | None:
    """The board's outputs (`digest` in its result) against this host's for the same file (`path`, whose bytes hash
    to `sha256`) and inputs, each reference computed once per file, signature and inputs (`references`, shared by
    the boards' threads under `lock`); None when the board sent none (a failed job)."""
    board = result.get("outputs")
    if not board:
        return None
    cfg = result.get("config") or {}
    key = (sha256, cfg.get("signature"), bool(cfg.get("weight_cache")), board.get("inputs_sha256"))
    with lock:
        if key not in references:
            references[key] = host_digest(path, result)
    ref = references[key]
    if "why" in ref:
        return {"compared": False, "why": ref["why"]}
    return {**compare(board, ref["digest"]), "reference": ref["runtime"]}
