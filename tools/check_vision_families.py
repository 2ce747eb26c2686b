"""Check: small random image classifiers of several Hugging Face families through quantize and both exporters. Not a test.

    .venv/bin/python tools/check_vision_families.py --out benchmarks/vision_families

The image side of tools/check_decoder_families.py (same check, same table): small classifiers with random weights
(BatchNorm statistics and norm gains drawn away from their initial values, so a norm folded in the wrong form shows),
saved as local Hugging Face directories and loaded as users' are (`AutoModelForImageClassification`, inputs as the
directory's preprocessor says: none here, so 3 x image_size, mean = std = 0.5), each quantized with every --recipe on
the bundled photos (`auto:BUDGET:ACTIVATION`: `--recipe auto --target rpi5 --runtime litert-xnnpack`) and exported to
TFLite and ONNX. The families are the backbones edge vision models are built on:
ResNet, RegNet (grouped convs), MobileNet v1 / v2, EfficientNet (depthwise, squeeze-excite), ConvNeXt (channels-first
LayerNorm, layer scale), ViT, DeiT, Swin, MobileViT, LeViT. sim vs float: the quantized model's logits against the
float model's on 8 random images (cosine; top-1 agreement). Writes OUT.json and OUT.md (command at the top). Never
imported by edgeq.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from check_decoder_families import CONFIG_MARK, check_families, table  # noqa: E402
from hostinfo import machine, write_result  # noqa: E402

SIZE = 64  # image side; every family below takes it


def configs() -> dict:
    import transformers as t

    labels = dict(num_labels=10, image_size=SIZE)
    stages = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return {
        "resnet": lambda: t.ResNetConfig(embedding_size=16, layer_type="bottleneck", **stages),
        "regnet": lambda: t.RegNetConfig(embedding_size=16, groups_width=8, **stages),
        "mobilenet_v1": lambda: t.MobileNetV1Config(depth_multiplier=0.25, **labels),
        "mobilenet_v2": lambda: t.MobileNetV2Config(depth_multiplier=0.35, **labels),
        "efficientnet": lambda: t.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                                     **labels),
        "convnext": lambda: t.ConvNextConfig(**stages, image_size=SIZE),
        "vit": lambda: t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   patch_size=16, **labels),
        # (two classification heads each: the config names the one to build)
        "deit": lambda: t.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     patch_size=16, architectures=["DeiTForImageClassification"], **labels),
        "swin": lambda: t.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, patch_size=4, **labels),
        "mobilevit": lambda: t.MobileViTConfig(hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 160],
                                               **labels),
        "levit": lambda: t.LevitConfig(hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                                       key_dim=[8, 8, 8], patch_size=16, architectures=["LevitForImageClassification"],
                                       **labels),
    }


def make(make_config, path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(make_config()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # trained-looking statistics, gains away from 1
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            w = getattr(m, "weight", None)
            if "Norm" in type(m).__name__ and isinstance(w, torch.Tensor):
                w.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    (path / CONFIG_MARK).write_text(make_config().to_json_string(), encoding="utf-8")


def float_agreement(model_dir: Path, qdir: Path) -> dict:
    import torch

    from edgeq.models import load_model
    from edgeq.quantize.qmodel import load_quantized

    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_model(str(model_dir)).module(images).logits.double()
        b = load_quantized(qdir).model(images).logits.double()
    return {"cos": round(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)), 5),
            "top1_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}


def main() -> None:
    import check_decoder_families

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-check-vision")
    ap.add_argument("--families", nargs="+", default=None, help="default: all")
    ap.add_argument("--recipe", nargs="+", default=["w8", "w8a8-static"],
                    help="presets or recipe files; auto:BUDGET:ACTIVATION (e.g. auto:40%%:static) is --recipe auto for "
                         "rpi5's LiteRT runtime at that budget")
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/check_vision_families.py"] + sys.argv[1:])
    check_decoder_families.float_agreement = float_agreement  # `check` measures the simulation on images here
    makers = configs()
    rows = check_families(makers, lambda family, path: make(makers[family], path), args.families, args.recipe,
                          Path(args.work))
    import transformers

    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "transformers": transformers.__version__, "image_size": SIZE, "rows": rows}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    lines = ["# Small image classifiers of Hugging Face families through quantize and both exporters (check)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {result['machine'].get('cpu', '')}, transformers {result['transformers']}. "
             f"{result['image_size']} px, random weights (BatchNorm statistics and norm gains away from their initial "
             "values), calibrated on the bundled photos. sim vs float: the quantized model's logits against the float "
             "model's on 8 random images (cosine / top-1 agreement); TFLite / ONNX: variant, `exact`, parity cosine "
             "against the simulation, TFLite layers read back (of the quantized ones).", ""]
    return "\n".join(lines + table(result)) + "\n"


if __name__ == "__main__":
    main()
