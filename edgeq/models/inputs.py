"""Model inputs from data sources: calibration and evaluation batches for each kind of workload."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeqError
from . import ModelBundle


def default_source(bundle: ModelBundle) -> str:
    return "images" if bundle.kind == "image" else "enwiki"


def calibration_batches(bundle: ModelBundle, source: str | None, samples: int, seq_len: int, batch_size: int = 4) -> list[tuple]:
    """Model-ready input tuples from the calibration half of `source` (disjoint from evaluation)."""
    from .. import data

    source = source or default_source(bundle)
    if bundle.kind == "causal-lm":
        windows = data.lm_windows(bundle.tokenizer, source, "calibration", seq_len, samples)
        ids = torch.from_numpy(windows)
        return [(ids[i : i + batch_size],) for i in range(0, len(ids), batch_size)]
    if bundle.kind == "encoder":
        texts = data.sentences(source, samples, split="calibration")
        return [encoder_inputs(bundle, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    if bundle.kind == "image":
        imgs = torch.from_numpy(image_inputs(bundle, source, samples, "calibration"))
        return [(imgs[i : i + batch_size],) for i in range(0, len(imgs), batch_size)]
    return generic_batches(bundle, source, samples, batch_size)


def image_inputs(bundle: ModelBundle, source: str, count: int, split: str) -> np.ndarray:
    """Float inputs [count, C, H, W] for an image model, from the given half of `source`: a .npy array's rows as they
    are (model-ready), or photos cropped, resized and normalised as the model takes them, averaged over the channels
    for a model that takes other than 3. The shape is the model's example input's (a factory's), else 3 x its
    `image_size` (224 unless its bundle says)."""
    from .. import data

    size = bundle.info.get("image_size", 224)
    shape = tuple(bundle.example_inputs[0].shape[1:]) if bundle.example_inputs else (3, size, size)
    if source.endswith(".npy"):
        return data.npy_rows(source, split, count, shape)
    channels, height, width = shape
    if height != width:
        raise EdgeqError(f"data: {bundle.reference!r} takes {height}x{width} images and photos are cropped square; "
                         "pass a .npy array of its inputs")
    imgs = data.images(source, count, width, split=split, mean=bundle.info.get("mean", 0.5), std=bundle.info.get("std", 0.5))
    return imgs if channels == 3 else np.repeat(imgs.mean(axis=1, keepdims=True), channels, axis=1)


def encoder_inputs(bundle: ModelBundle, texts: list[str]) -> tuple:
    enc = bundle.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return (enc["input_ids"], enc["attention_mask"])


def generic_batches(bundle: ModelBundle, source: str | None, samples: int, batch_size: int) -> list[tuple]:
    """A generic model calibrates on the first half of a .npy array of its first input (as many axes as its example
    input has, any sizes: the example fixes only what an export traces)."""
    if source and source.endswith(".npy"):
        from .. import data

        ex = bundle.example_inputs[0] if bundle.example_inputs else None
        shape, floating = (None, True) if ex is None else ((None,) * (ex.dim() - 1), ex.is_floating_point())
        t = torch.from_numpy(data.npy_rows(source, "calibration", samples, shape, floating))
        return [(t[i : i + batch_size],) for i in range(0, len(t), batch_size)]
    raise EdgeqError(f"data: model {bundle.reference!r} is a generic module; pass --calib FILE.npy with a batch of its inputs")
