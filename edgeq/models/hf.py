"""Local Hugging Face model directories (never a hub download)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import EdgeqError
from . import ModelBundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# torchao (pulled in by litert-torch) logs about CUDA kernels it cannot load on a CPU machine, and
# torch warns about its enums; neither concerns edgeq's users.
for _name in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, enable: bool):
    """A Hugging Face model runs its eager attention instead of sdpa while `enable` (other models: no change).

    GPTQ's attention-weighted value Hessians need the attention weights, which only eager attention returns;
    TFLite conversion of encoders needs the scores scaled after the matmul, because litert-torch lowers sdpa by
    scaling queries and keys by sqrt(scale) each, constants the converter folds into the query and key weights.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not enable or before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def load_hf_dir(path: Path, reference: str, **kwargs) -> ModelBundle:
    import transformers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise EdgeqError(f"model: directory {str(path)!r} has no config.json (not a Hugging Face model)")
    try:
        archs = json.loads(config_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"model: {config_file} is not valid JSON ({exc})") from None
    causal = any(a.endswith("ForCausalLM") for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:
        raise EdgeqError(f"model: cannot load Hugging Face directory {str(path)!r}: {type(exc).__name__}: {exc}") from None
    model.eval()
    kind = "causal-lm" if causal else "encoder"
    ids = torch.tensor([tokenizer("edgeq quantizes models for edge boards.")["input_ids"]])
    example = (ids,) if causal else (ids, torch.ones_like(ids))
    return ModelBundle(model, kind, reference, tokenizer=tokenizer, example_inputs=example)
