"""Model references: built-in names, local Hugging Face directories and `package.module:factory`.

`load_model(ref)` returns a `ModelBundle`: the float `nn.Module` in eval mode, what kind of
workload it is (which decides evaluation and export), a tokenizer for language models and
example inputs. Nothing is ever fetched from a hub: built-in models come from installed packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import EdgeqError

KINDS = ("causal-lm", "encoder", "image", "generic")


@dataclass
class ModelBundle:
    module: torch.nn.Module
    kind: str
    reference: str
    tokenizer: Any = None
    example_inputs: tuple = ()
    info: dict = field(default_factory=dict)
    structure: str = ""  # `structure_digest` of the module as loaded (set by `load_model`)

    @property
    def is_lm(self) -> bool:
        return self.kind == "causal-lm"


# name -> (loader, one-line description)
BUILTINS: dict[str, tuple[Callable[[], ModelBundle], str]] = {}


def builtin(name: str, description: str):
    def register(fn):
        BUILTINS[name] = (fn, description)
        return fn

    return register


def load_model(ref: str) -> ModelBundle:
    """Resolve a model reference; an unknown or broken one raises one line naming what was tried."""
    from .hf import load_hf_dir  # first: it quiets the libraries' start-up noise
    from . import builtins as _  # noqa: F401  (registers the built-in names)
    from .factory import load_factory
    from pathlib import Path

    ref = str(ref)
    path = Path(ref).expanduser()
    if ref in BUILTINS:
        bundle = BUILTINS[ref][0]()
    elif path.is_dir():
        bundle = load_hf_dir(path, reference=str(path.resolve()))
    elif ":" in ref and not path.exists():
        bundle = load_factory(ref)
    else:
        raise EdgeqError(
            f"model: {ref!r} is not a built-in name ({', '.join(sorted(BUILTINS))}), "
            "an existing Hugging Face model directory, or package.module:factory"
        )
    bundle.structure = structure_digest(bundle.module)
    return bundle


def structure_digest(module: torch.nn.Module) -> str:
    """sha256 of a model's module tree (names and classes) and of its tensors' names, shapes and dtypes: what a
    quantized-model directory records of the model it was made from, so that loading it into a model whose
    definition has changed since fails instead of computing with grids calibrated on another network."""
    import hashlib
    import json

    parts = [[name, type(m).__qualname__] for name, m in module.named_modules()]
    parts += [[k, list(v.shape), str(v.dtype)] for k, v in module.state_dict().items()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
