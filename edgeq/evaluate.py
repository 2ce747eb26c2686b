"""Evaluation: perplexity for LMs, embedding cosine for encoders, top-1 agreement and KL for image models.

A target is a model reference (float), a quantized-model directory (the PyTorch simulation) or an
exported .onnx / .tflite file (run in its runtime; its FILE.json names the source model, which
supplies the tokenizer and, for cosine / top-1, the FP32 reference). Evaluation data always comes
from the evaluation half of a source, disjoint from calibration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgeqError, choice_error
from .fileio import read_json, sha256_file

TASKS = ("ppl", "cosine", "top1")
DEFAULT_TASK = {"causal-lm": "ppl", "encoder": "cosine", "image": "top1"}


@dataclass
class Target:
    """What is evaluated: a callable over numpy inputs plus where it came from."""

    forward: Callable[..., np.ndarray]
    kind: str
    reference: str  # the model reference (for tokenizer and FP32 baseline)
    label: str  # fp32 | sim | onnx | tflite
    path: str
    sha256: str | None
    bundle: object = None
    fixed_seq_len: int | None = None  # a file exported for one sequence length (TFLite graphs are static)


def resolve_target(target: str, threads: int = 1) -> Target:
    """Open a model reference, QDIR or exported file for evaluation."""
    from .quantize.qmodel import is_qdir

    path = Path(target)
    if path.suffix in (".onnx", ".tflite") and path.is_file():
        meta_path = Path(str(path) + ".json")
        if not meta_path.is_file():
            from .export import prefill_of

            prefill = prefill_of(path)
            if prefill is not None and prefill.is_file():
                raise EdgeqError(f"eval: {path.name} is the one-token decode step of {prefill.name}, which computes the "
                                 f"same model over whole windows: evaluate {prefill}")
            raise EdgeqError(f"eval: {path} has no {meta_path.name} beside it (export it with edgeq export)")
        meta = read_json(meta_path)
        reference = (meta.get("source") or {}).get("model") if isinstance(meta, dict) else None
        if not reference:
            raise EdgeqError(f"eval: {meta_path.name} does not name its source model")
        sha = sha256_file(path)
        if meta.get("sha256") and meta["sha256"] != sha:  # truncated, damaged or replaced since the export
            raise EdgeqError(f"eval: {path} is not the file {meta_path.name} describes (sha256 {sha[:12]}, "
                             f"recorded {str(meta['sha256'])[:12]}): export it again")
        runner = _runner(path, threads)
        kind = _kind_of(reference)
        return Target(lambda *xs: runner(*xs)[0], kind, reference, path.suffix[1:], str(path), sha,
                      fixed_seq_len=_fixed_seq_len(meta))
    if path.suffix in (".onnx", ".tflite"):
        raise EdgeqError(f"eval: {str(path)!r} is a directory" if path.is_dir()
                         else f"eval: file {str(path)!r} does not exist")
    import torch

    if is_qdir(path):
        from .quantize.qmodel import load_quantized, quant_json_sha256

        qm = load_quantized(path)
        bundle, label, sha = qm.bundle, "sim", quant_json_sha256(path)
    else:
        from .models import load_model

        bundle, label, sha = load_model(target), "fp32", None
    model = bundle.module.eval()

    def forward(*xs):
        with torch.no_grad():
            out = model(*[torch.from_numpy(np.asarray(x)) for x in xs])
        out = out.logits if hasattr(out, "logits") else _first_tensor(out)
        return out.float().numpy()

    return Target(forward, bundle.kind, bundle.reference, label, str(path) if label == "sim" else target, sha, bundle)


def _fixed_seq_len(meta: dict) -> int | None:
    """The sequence length a file was exported for, when its first input has a fixed one."""
    inputs = meta.get("inputs") or []
    shape = inputs[0].get("shape") if inputs else None
    if shape and len(shape) >= 2 and isinstance(shape[1], int):
        return shape[1]
    return None


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise EdgeqError(f"eval: cannot find the output tensor in {type(out).__name__}")


def _kind_of(reference: str) -> str:
    from .models import load_model

    return load_model(reference).kind


def _runner(path: Path, threads: int):
    if path.suffix == ".onnx":
        from .export.onnx_runtime import OnnxRunner

        return OnnxRunner(str(path), threads=threads)
    from .export.tflite_runtime import TfliteRunner

    return TfliteRunner(str(path), threads=threads)


def perplexity(forward: Callable, windows: np.ndarray) -> dict:
    """exp(mean next-token cross-entropy) over windows [n, seq], one window per call."""
    nll, count = 0.0, 0
    for w in windows:
        logits = np.asarray(forward(w[None, :].astype(np.int64)), dtype=np.float64)[0, :-1]
        targets = w[1:]
        m = logits.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
        nll += float(np.sum(logz - logits[np.arange(len(targets)), targets]))
        count += len(targets)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def evaluate(target: str, task: str | None = None, data: str | None = None, count: int | None = None,
             seq_len: int | None = None, threads: int = 1) -> dict:
    """Evaluate a target; returns a JSON-ready dict with the metrics and what was measured on. Perplexity windows are
    `seq_len` tokens: by default a fixed-shape file's own length (a TFLite export), otherwise 512."""
    from . import data as datamod

    t = resolve_target(target, threads)
    task = task or DEFAULT_TASK.get(t.kind)
    if task not in TASKS:
        raise choice_error("task", task, TASKS)
    if task != DEFAULT_TASK.get(t.kind):
        raise EdgeqError(f"task: {task!r} does not apply to a {t.kind} model (use {DEFAULT_TASK.get(t.kind, 'none')!r})")
    start = time.perf_counter()
    source = data or ("images" if t.kind == "image" else "enwiki")
    if task == "ppl":
        from .models import load_model

        tokenizer = t.bundle.tokenizer if t.bundle is not None else load_model(t.reference).tokenizer
        seq_len = seq_len or t.fixed_seq_len or 512
        if t.fixed_seq_len and t.fixed_seq_len != seq_len:
            raise EdgeqError(f"eval: {t.path} was exported for sequences of {t.fixed_seq_len} tokens; "
                             f"pass --seq-len {t.fixed_seq_len} (or export with seq_len={seq_len})")
        windows = datamod.lm_windows(tokenizer, source, "evaluation", seq_len, count or 16)
        metrics = perplexity(t.forward, windows)
    else:
        metrics = _against_fp32(t, task, source, count)
    return {
        "target": t.path, "label": t.label, "model": t.reference, "sha256": t.sha256, "task": task,
        "data": source, "seq_len": seq_len if task == "ppl" else None, "metrics": metrics, "seconds": round(time.perf_counter() - start, 3), "threads": threads,
    }


def _against_fp32(t: Target, task: str, source: str, count: int | None) -> dict:
    from . import data as datamod

    ref = resolve_target(t.reference)
    if task == "cosine":
        bundle = ref.bundle
        texts = datamod.sentences(source, count or 64)
        # a file exported for a fixed length (TFLite) gets every sentence padded to it, the padding masked out (the
        # reference sees the same padded input; pooling reads the unmasked tokens only)
        fixed = {"padding": "max_length", "max_length": t.fixed_seq_len} if t.fixed_seq_len else {"max_length": 128}
        cos = []
        for text in texts:
            enc = bundle.tokenizer([text], return_tensors="np", truncation=True, **fixed)
            ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
            a = _mean_pool(ref.forward(ids, mask), mask)
            b = _mean_pool(t.forward(ids, mask), mask)
            cos.append(float(_cosine(a, b)[0]))
        return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "sentences": len(cos)}
    from .models.inputs import image_inputs

    imgs = image_inputs(ref.bundle, source, count or 32, "evaluation")
    agree, kls = 0, []
    for img in imgs:
        a = ref.forward(img[None]).astype(np.float64)[0]
        b = t.forward(img[None]).astype(np.float64)[0]
        agree += int(a.argmax() == b.argmax())
        pa, pb = _softmax(a), _softmax(b)
        kls.append(float(np.sum(pa * (np.log(pa + 1e-12) - np.log(pb + 1e-12)))))
    return {"top1_agree": agree / len(imgs), "kl_mean": float(np.mean(kls)), "images": len(imgs)}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
