"""What every exporter shares: held-back inputs, parity metrics and the `FILE.json` beside the file."""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..fileio import sha256_file, write_json_atomic

# How many held-back samples parity runs. An LM's 4 give 4 x 64 rows and an encoder's 4 sentences ~120 token rows;
# an image model (or a generic one) gives one row per sample, and with 4 of them one flipped top-1 read as 0.75
# agreement, below every variant's tolerance, so they take 32 (one flip: 0.97).
PARITY_SAMPLES = 4
PARITY_SAMPLES_ONE_ROW = 32


def parity_samples(bundle) -> int:
    """The default number of parity samples for `bundle`'s kind (`PARITY_SAMPLES`, `PARITY_SAMPLES_ONE_ROW`)."""
    return PARITY_SAMPLES if bundle.kind in ("causal-lm", "encoder") else PARITY_SAMPLES_ONE_ROW


def held_back_inputs(bundle, count: int | None = None, seq_len: int = 64) -> list[tuple]:
    """Inputs from the evaluation half of the default data (never seen by calibration), one sample each; `count` of
    them, by default `parity_samples(bundle)`."""
    from .. import data
    from ..models.inputs import default_source, encoder_inputs, image_inputs

    count = parity_samples(bundle) if count is None else count
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
def perturbed_quant_inputs(model: torch.nn.Module, rel: float | Mapping[str, float] | None = None, seed: int = 0):
    """Multiply every quantized layer's input by (1 + rel * N(0, 1)) while inside.

    Float reassociation in a runtime (other matmul blocking, fused kernels) changes activations by
    about this much; where a value then sits on a rounding tie of an activation grid it lands one
    step away, and a deep model can carry that step to its outputs. Running the simulation against
    itself this way measures how far apart two faithful renderings of the same integers can be.
    `rel`: one for every layer, or per layer name (`NOISE_REL` for a layer it does not name); by default
    `NOISE_REL`, read at the call (tools/probe_noise_floor.py sets it).
    """
    gen = torch.Generator().manual_seed(seed)
    rel = NOISE_REL if rel is None else rel

    def hook(module, args):
        x = args[0]
        if not x.is_floating_point():  # an embedding's token ids
            return None
        scale = rel.get(module.decision.name, NOISE_REL) if isinstance(rel, Mapping) else rel
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return (x * (1 + scale * noise), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if hasattr(m, "decision") and m.decision.kind != "embedding"]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


# How many perturbed runs the noise floor takes, at most and at least. The floor is the worst of them, so a file whose
# departure from the simulation is float noise like theirs falls below the worst of all NOISE_DRAWS on a measure with
# probability 1 / (NOISE_DRAWS + 1): 5% (the worst of 3 flagged a quarter of faithful files; SmolLM2's w8.onnx in
# `make demo`, 0.937 on the worst row, sat below the first 3 draws' 0.940 and in the middle of 19, which went from
# 0.848 to 0.971). A draw costs a forward of every parity sample: ~1.2 s on SmolLM2's 4 x 64 tokens, ~2 s on
# EfficientNet-Lite0's 32 images.
NOISE_DRAWS = 19
NOISE_DRAWS_MIN = 3


def noise_floor(model: torch.nn.Module, run, inputs: list, reference: list[np.ndarray], causal_lm: bool = False,
                file: dict | None = None) -> dict | None:
    """Parity of the simulation with itself under `perturbed_quant_inputs`, the worst of its draws (None without
    quantized layers), with each draw's worst row and top-1 agreement (`per_draw`); for an LM also how far the draws'
    mean NLL strays from the simulation's (`nll_spread`, and each draw's in `per_draw`).

    With `file`, a file's parity (what `verdict.within_noise_floor` reads: its row checks and an LM's `nll`), drawing
    stops once the file is within the floor, after `NOISE_DRAWS_MIN` draws: more draws only lower the floor, so the
    verdict is the one all `NOISE_DRAWS` give, and a faithful file does not wait for them. Without it, all of them.
    `run(sample)` returns the first output of the wrapper being exported, as numpy.
    """
    from .verdict import within_noise_floor

    simulation_nll = None
    if causal_lm:  # the file's parity has it already where it has an NLL
        simulation_nll = ((file or {}).get("nll") or {}).get("simulation")
        if simulation_nll is None:
            simulation_nll = lm_nll(reference, inputs)
    metrics, offsets = [], []
    with torch.no_grad():
        for seed in range(NOISE_DRAWS):
            with perturbed_quant_inputs(model, seed=seed) as hooked:
                if not hooked:
                    return None
                perturbed = [run(x) for x in inputs]
            metrics.append(parity_metrics(reference, perturbed))
            if causal_lm:
                offsets.append(lm_nll(perturbed, inputs) - simulation_nll)
            floor = _worst_of(metrics, offsets)
            if (file is not None and len(metrics) >= NOISE_DRAWS_MIN
                    and within_noise_floor({**file, "noise_floor": floor})):
                break
    floor["method"] = (f"the PyTorch simulation against itself with every quantized layer's input multiplied by "
                       f"(1 + {NOISE_REL:g} N(0,1)), the worst of {len(metrics)} draws: how far float reassociation "
                       f"alone moves the outputs. Drawn until the file is within it ({NOISE_DRAWS_MIN} to "
                       f"{NOISE_DRAWS}): a file that departs from the simulation by such noise falls below the "
                       f"worst of {NOISE_DRAWS} on a measure with probability 1/{NOISE_DRAWS + 1}")
    return floor


def _worst_of(metrics: list[dict], offsets: list[float]) -> dict:
    """The noise floor of these draws (`parity_metrics` each, and an LM's mean NLL offsets from the simulation's)."""
    floor = {"max_abs": max(m["max_abs"] for m in metrics), "cos_min": min(m["cos_min"] for m in metrics),
             "top1_agree": min(m["top1_agree"] for m in metrics), "rows": metrics[0]["rows"],
             "samples": metrics[0]["samples"], "draws": len(metrics),
             "per_draw": {"cos_min": [m["cos_min"] for m in metrics], "top1_agree": [m["top1_agree"] for m in metrics]}}
    if offsets:
        floor["nll_spread"] = max(map(abs, offsets))
        floor["per_draw"]["nll_offset"] = offsets
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
    """Put a file's parity next to what it means: for LMs the NLL of both, and the simulation's noise floor (drawn
    until the file is within it: `parity` must hold every check `verdict.within_noise_floor` reads by now)."""
    if causal_lm:
        parity["nll"] = {"simulation": lm_nll(reference, inputs), "file": lm_nll(got, inputs),
                         "tokens": sum(int(np.asarray(x[0]).size) - 1 for x in inputs)}
    floor = noise_floor(model, run, inputs, reference, causal_lm, file=parity)
    if floor is not None:
        parity["noise_floor"] = floor
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
