"""What every exporter shares: held-back inputs, parity metrics and the `FILE.json` beside the file."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import torch

from ..fileio import sha256_file, write_json_atomic

PARITY_SAMPLES = 4


def held_back_inputs(bundle, count: int = PARITY_SAMPLES, seq_len: int = 64) -> list[tuple]:
    """Inputs from the evaluation half of the default data (never seen by calibration), one sample each."""
    from .. import data
    from ..models.inputs import default_source, encoder_inputs

    source = default_source(bundle)
    if bundle.kind == "causal-lm":
        windows = torch.from_numpy(data.lm_windows(bundle.tokenizer, source, "evaluation", seq_len, count))
        return [(windows[i : i + 1],) for i in range(len(windows))]
    if bundle.kind == "encoder":
        return [encoder_inputs(bundle, [s]) for s in data.sentences(source, count)]
    if bundle.kind == "image":
        imgs = torch.from_numpy(data.images(source, count, bundle.info.get("image_size", 224)))
        return [(imgs[i : i + 1],) for i in range(count)]
    ex = bundle.example_inputs
    gen = torch.Generator().manual_seed(1234)
    return [tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for t in ex) for _ in range(count)]


def parity_metrics(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """max |a - b|, the minimum cosine similarity over output rows, and top-1 agreement over rows."""
    max_abs, cos_min, agree, rows = 0.0, 1.0, 0, 0
    for a, b in zip(reference, candidate):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64).reshape(a.shape)
        max_abs = max(max_abs, float(np.max(np.abs(a - b))) if a.size else 0.0)
        a2 = a.reshape(-1, a.shape[-1])
        b2 = b.reshape(-1, b.shape[-1])
        num = np.sum(a2 * b2, axis=1)
        den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
        cos_min = min(cos_min, float(cos.min()))
        agree += int(np.sum(a2.argmax(axis=1) == b2.argmax(axis=1)))
        rows += a2.shape[0]
    return {"max_abs": max_abs, "cos_min": cos_min, "top1_agree": agree / rows if rows else None, "rows": rows,
            "samples": len(reference)}


def write_export_meta(out: Path, *, fmt: str, variant: str, model: str, qdir: str | None, recipe: str | None,
                      exact: bool | None, parity: dict, inputs: list[dict], extra: dict | None = None,
                      files: list[Path] = ()) -> dict:
    """Write `OUT.json` (atomic) and return it.

    `model` is the model reference the file came from (so `edgeq eval FILE` can rebuild the float
    reference), `qdir` the quantized-model directory (None for FP32 exports), `files` companion
    files such as ONNX external data, hashed too.
    """
    from ..quantize.qmodel import quant_json_sha256

    meta = {
        "format": fmt,
        "variant": variant,
        "sha256": sha256_file(out),
        "size_bytes": out.stat().st_size + sum(Path(f).stat().st_size for f in files),
        "files": [{"name": Path(f).name, "sha256": sha256_file(f), "size_bytes": Path(f).stat().st_size} for f in files],
        "source": {
            "model": model,
            "qdir": str(Path(qdir).resolve()) if qdir else None,
            "quant_json_sha256": quant_json_sha256(qdir) if qdir else None,
        },
        "recipe": recipe,
        "exact": exact,
        "parity": parity,
        "inputs": inputs,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    write_json_atomic(Path(str(out) + ".json"), meta)
    return meta
