"""`package.module:factory` model references: the factory returns a module or (module, example_inputs)."""

from __future__ import annotations

import importlib
import sys

import torch

from ..errors import EdgeqError
from . import ModelBundle


def load_factory(ref: str) -> ModelBundle:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr.isidentifier():
        raise EdgeqError(f"model: {ref!r} is not of the form package.module:factory")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, let a factory in the working directory be found
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise EdgeqError(f"model: cannot import {module_name!r} for {ref!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EdgeqError(f"model: {module_name!r} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as exc:
        raise EdgeqError(f"model: factory {ref!r} failed: {type(exc).__name__}: {exc}") from None
    example: tuple = ()
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
        example = example if isinstance(example, tuple) else (example,)
    if not isinstance(made, torch.nn.Module):
        raise EdgeqError(f"model: factory {ref!r} returned {type(made).__name__}, not a torch.nn.Module")
    kind = "image" if example and example[0].dim() == 4 and example[0].is_floating_point() else "generic"
    return ModelBundle(made.eval(), kind, ref, example_inputs=example)
