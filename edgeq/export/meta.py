"""What every exporter shares: held-back inputs, parity metrics and the `FILE.json` beside the file."""

from __future__ import annotations

import contextlib
import datetime as _dt
from pathlib import Path

import numpy as np
import torch

from ..fileio import sha256_file, write_json_atomic

PARITY_SAMPLES = 4


def held_back_inputs(bundle, count: int = PARITY_SAMPLES, seq_len: int = 64) -> list[tuple]:
    """Inputs from the evaluation half of the default data (never seen by calibration), one sample each."""
    from .. import data
    from ..models.inputs import default_source, encoder_inputs, image_inputs

    source = default_source(bundle)
    if bundle.kind == "causal-lm":
        windows = torch.from_numpy(data.lm_windows(bundle.tokenizer, source, "evaluation", seq_len, count))
        return [(windows[i : i + 1],) for i in range(len(windows))]
    if bundle.kind == "encoder":
        return [encoder_inputs(bundle, [s]) for s in data.sentences(source, count)]
    if bundle.kind == "image":
        imgs = torch.from_numpy(image_inputs(bundle, source, count, "evaluation"))
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


NOISE_REL = 1e-6


@contextlib.contextmanager
def perturbed_quant_inputs(model: torch.nn.Module, rel: float = NOISE_REL, seed: int = 0):
    """Multiply every quantized layer's input by (1 + rel * N(0, 1)) while inside.

    Float reassociation in a runtime (other matmul blocking, fused kernels) changes activations by
    about this much; where a value then sits on a rounding tie of an activation grid it lands one
    step away, and a deep model can carry that step to its outputs. Running the simulation against
    itself this way measures how far apart two faithful renderings of the same integers can be.
    """
    gen = torch.Generator().manual_seed(seed)

    def hook(module, args):
        x = args[0]
        if not x.is_floating_point():  # an embedding's token ids
            return None
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return (x * (1 + rel * noise), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if hasattr(m, "decision") and m.decision.kind != "embedding"]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


NOISE_DRAWS = 3


def noise_floor(model: torch.nn.Module, run, inputs: list, reference: list[np.ndarray], causal_lm: bool = False) -> dict | None:
    """Parity of the simulation with itself under `perturbed_quant_inputs`, the worst of `NOISE_DRAWS` draws (None
    without quantized layers); for an LM also how far the draws' mean NLL strays from the simulation's (`nll_spread`).

    `run(sample)` returns the first output of the wrapper being exported, as numpy.
    """
    draws = []
    with torch.no_grad():
        for seed in range(NOISE_DRAWS):
            with perturbed_quant_inputs(model, seed=seed) as hooked:
                if not hooked:
                    return None
                perturbed = [run(x) for x in inputs]
            draws.append((parity_metrics(reference, perturbed), lm_nll(perturbed, inputs) if causal_lm else None))
    metrics = [m for m, _ in draws]
    floor = {"max_abs": max(m["max_abs"] for m in metrics), "cos_min": min(m["cos_min"] for m in metrics),
             "top1_agree": min(m["top1_agree"] for m in metrics), "rows": metrics[0]["rows"], "samples": metrics[0]["samples"],
             "draws": NOISE_DRAWS}
    if causal_lm:
        nll = lm_nll(reference, inputs)
        floor["nll_spread"] = max(abs(d - nll) for _, d in draws)
    floor["method"] = (f"the PyTorch simulation against itself with every quantized layer's input multiplied by "
                       f"(1 + {NOISE_REL:g} N(0,1)), the worst of {NOISE_DRAWS} draws: how far float reassociation alone "
                       "moves the outputs")
    return floor


def lm_nll(logits: list[np.ndarray], inputs: list[tuple]) -> float:
    """Mean next-token negative log-likelihood of a causal LM's logits on its own input ids."""
    total, count = 0.0, 0
    for lg, sample in zip(logits, inputs):
        ids = np.asarray(sample[0]).reshape(-1)
        lg = np.asarray(lg, dtype=np.float64).reshape(-1, lg.shape[-1])[: len(ids) - 1]
        m = lg.max(axis=1, keepdims=True)
        logp = lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return total / max(count, 1)


def add_quality_context(parity: dict, model, run, inputs: list, reference: list, got: list, causal_lm: bool) -> dict:
    """Put a file's parity next to what it means: the simulation's noise floor, and for LMs the NLL of both."""
    floor = noise_floor(model, run, inputs, reference, causal_lm)
    if floor is not None:
        parity["noise_floor"] = floor
    if causal_lm:
        parity["nll"] = {"simulation": lm_nll(reference, inputs), "file": lm_nll(got, inputs),
                         "tokens": sum(int(np.asarray(x[0]).size) - 1 for x in inputs)}
    return parity


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
