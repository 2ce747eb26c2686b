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
        size = bundle.info.get("image_size", 224)
        imgs = torch.from_numpy(data.images(source, samples, size, split="calibration",
                                            mean=bundle.info.get("mean", 0.5), std=bundle.info.get("std", 0.5)))
        return [(imgs[i : i + batch_size],) for i in range(0, len(imgs), batch_size)]
    return generic_batches(bundle, source, samples, batch_size)


def encoder_inputs(bundle: ModelBundle, texts: list[str]) -> tuple:
    enc = bundle.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return (enc["input_ids"], enc["attention_mask"])


def generic_batches(bundle: ModelBundle, source: str | None, samples: int, batch_size: int) -> list[tuple]:
    """A generic model calibrates on a .npy array of inputs (first input only), or on images for 4-D image inputs."""
    if source and source.endswith(".npy"):
        try:
            arr = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EdgeqError(f"data: cannot read {source!r} as a .npy array ({exc})") from None
        t = torch.from_numpy(arr)[:samples]
        return [(t[i : i + batch_size],) for i in range(0, len(t), batch_size)]
    if bundle.example_inputs and bundle.example_inputs[0].dim() == 4 and source:
        from .. import data

        ex = bundle.example_inputs[0]
        imgs = data.images(source, samples, ex.shape[-1], split="calibration")
        imgs = torch.from_numpy(imgs)
        if ex.shape[1] != 3:
            imgs = imgs.mean(dim=1, keepdim=True).expand(-1, ex.shape[1], -1, -1)
        return [(imgs[i : i + batch_size].contiguous(),) for i in range(0, len(imgs), batch_size)]
    raise EdgeqError(f"data: model {bundle.reference!r} is a generic module; pass --calib FILE.npy with a batch of its inputs")
